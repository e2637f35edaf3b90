"""Pattern completion with a plastic recurrent network (Miconi, Clune & Stanley, "Differentiable
plasticity", ICML 2018: the binary pattern memorization task).

The task, as the paper sets it up: each episode shows 5 random binary patterns of 1000 bits (+1 or
-1, half of each), every pattern twice, for 6 steps each with 4 steps of zero input in between;
then one of the patterns with half of its bits zeroed is shown for 6 steps, and the network must
output the full pattern. Inputs are multiplied by 20, and one more neuron, the bias neuron, always
receives 1 (1001 neurons). The patterns change every episode, so they cannot be stored in the
weights: only the within-episode Hebbian trace can hold them.

The network is `neuronml_fast.nn.PlasticRNN`:

    y_t = tanh((W + alpha * Hebb_t) y_{t-1} + input_t),  Hebb_{t+1} = (1 - eta) Hebb_t + eta y_t y_{t-1}^T

with W and alpha learned per connection and eta learned (Adam, learning rate 3e-4, one episode per
iteration, loss: squared error of the final output's pattern bits). The error is the fraction of
bits whose sign is wrong. The non-plastic network is the same network with alpha held at 0: it
gets the same episodes and the same training, and cannot do better than copying the degraded
pattern (an error near 0.25: half the bits are zero, and a guess is wrong half the time).

``--eager-iterations K`` also trains a copy of the plastic network from the same initialization on
the same episodes with the paper's own formulation in plain PyTorch (row vectors, ``y.bmm(w +
alpha * hebb)`` and a ``bmm`` outer product per step: the published eager loop) and reports the
time per iteration of both and how far apart their losses are.

    python examples/pattern_completion.py --out runs/pattern_completion
"""

import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import neuronml_fast as nf  # noqa: E402


def episodes(generator, batch, size, patterns, cycles, present, delay, test_present, degrade, gain):
    """One batch of episodes: (input [T, batch, size + 1], target [batch, size]), on the CPU."""
    steps = cycles * patterns * (present + delay) + test_present
    # Balanced patterns: a random permutation of size/2 bits at -1 and the rest at +1.
    rank = torch.rand(batch, patterns, size, generator=generator).argsort(-1)
    stored = torch.where(rank < size // 2, -1.0, 1.0)
    x = torch.zeros(steps, batch, size + 1)
    for cycle in range(cycles):
        order = torch.rand(batch, patterns, generator=generator).argsort(-1)  # a new order every cycle
        shown = stored.gather(1, order[:, :, None].expand(-1, -1, size))
        for k in range(patterns):
            start = (cycle * patterns + k) * (present + delay)
            x[start:start + present, :, :size] = shown[:, k]
    which = torch.randint(patterns, (batch,), generator=generator)
    target = stored[torch.arange(batch), which]
    # Exactly degrade * size bits of the test pattern are zeroed, chosen at random.
    kept = torch.rand(batch, size, generator=generator).argsort(-1) >= int(degrade * size)
    x[steps - test_present:, :, :size] = target * kept
    x[:, :, size] = 1.0  # the bias neuron
    return x * gain, target


class PublishedLoop(nn.Module):
    """The published eager formulation: row vectors, weights stored [pre, post], one ``bmm`` per step
    for the recurrent input and one for the trace's outer product. Built from a `PlasticRNN` (whose
    weights are [post, pre]), so both start from the same network."""

    def __init__(self, rnn):
        super().__init__()
        self.w = nn.Parameter(rnn.weight.detach().t().contiguous())
        self.alpha = nn.Parameter(rnn.alpha.detach().t().contiguous())
        self.eta_logit = nn.Parameter(rnn.eta_logit.detach().clone(), requires_grad=rnn.eta_logit.requires_grad)

    def forward(self, x):
        eta = torch.sigmoid(self.eta_logit)
        steps, batch, n = x.shape
        y = x.new_zeros(batch, n)
        hebb = x.new_zeros(batch, n, n)
        for t in range(steps):
            y_new = torch.tanh(y.unsqueeze(1).bmm(self.w + self.alpha * hebb).squeeze(1) + x[t])
            hebb = (1 - eta) * hebb + eta * torch.bmm(y.unsqueeze(2), y_new.unsqueeze(1))
            y = y_new
        return y


def network(size, plastic, dev):
    rnn = nf.nn.PlasticRNN(size + 1, eta=0.01 if plastic else 0.0, device=dev)
    if not plastic:
        with torch.no_grad():
            rnn.alpha.zero_()
        rnn.alpha.requires_grad_(False)
    return rnn


def final_output(model, x):
    if isinstance(model, PublishedLoop):
        return model(x)
    output, _ = model(x)
    return output[-1]


def train(model, args, dev, iterations, name):
    """Trains on the episodes of ``args.seed``; returns per-iteration (loss, error) and seconds per iteration."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def step():
        x, target = episodes(generator, args.batch, args.pattern_size, args.patterns, args.cycles, args.present,
                             args.delay, args.present, args.degrade, args.gain)
        x, target = x.to(dev), target.to(dev)
        y = final_output(model, x)[:, :args.pattern_size]
        loss = (y - target).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, (torch.sign(y.detach()) != target).float().mean()

    return _common.train_loop(step, iterations, dev, args.report_every, name, "error", ".3f")


def build_parser():
    parser = _common.parser(__doc__, iterations=500, out="runs/pattern_completion")
    parser.add_argument("--pattern-size", type=_common.positive_int, default=1000, help="bits per pattern")
    parser.add_argument("--patterns", type=_common.positive_int, default=5, help="patterns per episode")
    parser.add_argument("--cycles", type=_common.positive_int, default=2, help="presentations of each pattern")
    parser.add_argument("--present", type=_common.positive_int, default=6,
                        help="steps per presentation (the test pattern's too)")
    parser.add_argument("--delay", type=_common.nonnegative_int, default=4,
                        help="zero-input steps between presentations")
    parser.add_argument("--degrade", type=_common.fraction, default=0.5,
                        help="fraction of the test pattern's bits zeroed")
    parser.add_argument("--gain", type=_common.positive_float, default=20.0, help="input strength")
    parser.add_argument("--batch", type=_common.positive_int, default=1, help="episodes per iteration")
    parser.add_argument("--lr", type=_common.positive_float, default=3e-4, help="Adam learning rate")
    _common.add_plastic_comparison(parser, "error", eager_iterations=20)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    dev = _common.setup(parser, args)
    wall = time.perf_counter()

    plastic = network(args.pattern_size, True, dev)
    torch.manual_seed(args.seed + 1)
    fixed = network(args.pattern_size, False, dev)
    published = PublishedLoop(plastic) if args.eager_iterations else None

    p_loss, p_err, p_sec = train(plastic, args, dev, args.iterations, "plastic")
    f_loss, f_err, f_sec = train(fixed, args, dev, args.iterations, "non-plastic")

    every = args.report_every
    rows = [{"iteration": min(i + every, args.iterations), "plastic_error": pe, "plastic_loss": pl,
             "nonplastic_error": fe, "nonplastic_loss": fl}
            for i, pe, pl, fe, fl in zip(range(0, args.iterations, every),
                                         *(_common.block_means(v, every) for v in (p_err, p_loss, f_err, f_loss)))]
    _common.write_curve(args.out, rows, "iteration",
                        [("plastic_error", "plastic"), ("nonplastic_error", "non-plastic")],
                        "fraction of wrong bits (mean over the block)", "Pattern completion (Miconi et al. 2018)")

    eager, gap, e_sec = "", None, None
    if published is not None:
        k = min(args.eager_iterations, args.iterations)
        e_loss, _, e_sec = train(published, args, dev, k, "published eager loop")
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(e_loss, p_loss[:k]))
        eager = (f"; published eager loop {e_sec:.3f} s/iter over {k} iterations, {e_sec / p_sec:.1f}x slower, "
                 f"its losses within {gap:.1e} of ours")
    last_block = args.iterations - (len(rows) - 1) * every
    line = (f"pattern_completion: error over the last {last_block} of {args.iterations} iterations: "
            f"plastic {rows[-1]['plastic_error']:.3f}, non-plastic {rows[-1]['nonplastic_error']:.3f}; "
            f"plastic {p_sec:.3f} s/iter on {dev.type} "
            f"(backend {nf.backends.resolve('plastic', dev.type, torch.float32)})"
            f"{eager}; wall {time.perf_counter() - wall:.0f} s")
    _common.summarize(args.out, line)
    return {"rows": rows, "plastic_loss": p_loss, "nonplastic_loss": f_loss, "sec_per_iter": p_sec,
            "eager_sec_per_iter": e_sec, "eager_loss_gap": gap}


if __name__ == "__main__":
    main()
