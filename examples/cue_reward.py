"""Cue-reward association with endogenous neuromodulation (Miconi, Rawal, Clune & Stanley,
"Backpropamine: training self-modifying neural networks with differentiable neuromodulated
plasticity", ICLR 2019: the cue-reward association task).

The task, as the paper sets it up: each episode draws 4 random cues (20 bits of +1 or -1, all
different) and picks one as the target. The episode (120 steps) is a run of trials; a trial lasts
5 to 8 steps (2 + 3 + a random 0..3): a blank step, 2 of the 4 cues shown once each at random
steps, a "go" step at which the network answers whether the target was among them, and a last
blank step at which it learns what the right answer was. Which cue is the target changes every
episode, so the network must discover it within the episode, from the feedback. The inputs are
the cue, the go bit, the feedback (2 one-hot bits), a bias of 1 and the time within the episode.

The network is a recurrent layer of neurons (`neuronml_fast.nn.PlasticRNN`; 100 by default so
that the three networks train in minutes on a laptop CPU, the paper's 200 with ``--size 200``),
the inputs projected in by a linear layer and the answer read out by another:

    y_t     = tanh((W + alpha * Hebb_t) y_{t-1} + W_in x_t + b_in)
    M_t     = tanh(mod_weight . y_t + mod_bias)                  (the modulator neuron)
    Hebb_{t+1} = clip(Hebb_t + M_t * y_t y_{t-1}^T, -1, 1)

as the paper's code writes it (one modulator neuron per network, its output fed to every
connection, the trace clipped at 1). The paper compares it with a non-modulated plastic network
(the same trace with a learned constant in place of M_t) and a non-plastic one (alpha = 0); all
three train here on the same episodes. The paper trains with A2C, the network's action at the go
step deciding its reward; here the answer is trained directly (cross-entropy at the go steps) and
the feedback step shows the right answer, which carries the same information as the reward of the
paper's version (the reward of its own answer tells the agent which answer was right), so each
episode is one `plastic_rnn` call. The score is the paper's: reward per episode, +1 per right
answer and -1 per wrong one (about 18 trials per episode; always answering the same scores about 0).

``--eager-iterations K`` also trains a copy of the modulated network from the same initialization on
the same episodes with the paper's own step in plain PyTorch (its row-per-neuron matrices, a batched
``matmul`` per step, the modulator and the clipped ``bmm`` outer product: the published eager loop)
and reports the time per iteration of both and how far apart their losses are.

    python examples/cue_reward.py --out runs/cue_reward
"""

import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import neuronml_fast as nf  # noqa: E402

KINDS = ("modulated", "plastic", "non-plastic")


def episodes(generator, batch, cues, cue_bits, steps):
    """One batch of episodes: (input [steps, batch, cue_bits + 5], go [steps, batch] (bool),
    answer [steps, batch] (1 where the target was shown in the trial), on the CPU."""
    inputs = cue_bits + 5  # cue, go bit, feedback (2), bias, time
    x = torch.zeros(steps, batch, inputs)
    go = torch.zeros(steps, batch, dtype=torch.bool)
    answer = torch.zeros(steps, batch, dtype=torch.long)
    for b in range(batch):
        patterns = _distinct_cues(generator, cues, cue_bits)
        target = int(torch.randint(cues, (1,), generator=generator))
        t = 0
        while True:
            length = cues // 2 + 3 + int(torch.randint(cues, (1,), generator=generator))
            if t + length > steps:
                break
            shown = torch.randperm(cues, generator=generator)[:cues // 2]
            slots = 1 + torch.randperm(length - 3, generator=generator)[:cues // 2]  # between the blanks and go
            for cue, slot in zip(shown.tolist(), slots.tolist()):
                x[t + slot, b, :cue_bits] = patterns[cue]
            right = int(target in shown.tolist())
            x[t + length - 2, b, cue_bits] = 1.0  # go
            go[t + length - 2, b] = True
            answer[t + length - 2, b] = right
            x[t + length - 1, b, cue_bits + 1 + right] = 1.0  # the feedback: which answer was right
            t += length
    x[:, :, cue_bits + 3] = 1.0  # bias
    x[:, :, cue_bits + 4] = torch.arange(steps, dtype=x.dtype)[:, None] / steps
    return x, go, answer


def _distinct_cues(generator, cues, cue_bits):
    while True:
        patterns = torch.randint(2, (cues, cue_bits), generator=generator).float() * 2 - 1
        if len({tuple(p.tolist()) for p in patterns}) == cues:
            return patterns


class CueRewardNetwork(nn.Module):
    """Input projection, a plastic recurrent layer, a 2-way readout. ``kind``: "modulated" (a
    modulator neuron, backpropamine), "plastic" (a learned constant in its place) or "non-plastic"."""

    def __init__(self, inputs, size, kind, clip, dev):
        super().__init__()
        self.kind = kind
        self.i2h = nn.Linear(inputs, size, device=dev)
        self.rnn = nf.nn.PlasticRNN(size, clip=clip, modulator="sequence" if kind == "modulated" else None,
                                    eta=0.0, device=dev)
        if kind == "plastic":  # the paper's non-modulated network: Hebb + eta y y^T, eta learned from 0.1
            self.eta = nn.Parameter(torch.tensor(0.1, device=dev))
        if kind == "non-plastic":
            with torch.no_grad():
                self.rnn.alpha.zero_()
            self.rnn.alpha.requires_grad_(False)
        self.h2o = nn.Linear(size, 2, device=dev)

    def forward(self, x):
        drive = self.i2h(x)
        # The non-modulated network's trace grows by eta y y^T: the modulated rule with M_t = eta.
        modulation = self.eta.expand(x.shape[:2]) if self.kind == "plastic" else None
        y, _ = self.rnn(drive, modulation=modulation)
        return self.h2o(y)


class PublishedLoop(nn.Module):
    """The paper's eager step (its cue-reward code): matrices with one row per neuron's inputs, a
    batched ``matmul`` for the recurrent input, the modulator neuron, and the clipped ``bmm``
    outer product, step by step. Shares the parameters of a modulated `CueRewardNetwork`."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        rnn, clip = self.net.rnn, self.net.rnn.clip
        steps, batch, _ = x.shape
        n = rnn.size
        drive = self.net.i2h(x)
        hidden = x.new_zeros(batch, n)
        hebb = x.new_zeros(batch, n, n)
        outputs = []
        for t in range(steps):
            hactiv = torch.tanh(drive[t].view(batch, n, 1) + torch.matmul(rnn.weight + rnn.alpha * hebb,
                                                                         hidden.view(batch, n, 1))).view(batch, n)
            da = torch.tanh(hactiv.mm(rnn.mod_weight.view(n, 1)) + rnn.mod_bias)
            deltahebb = torch.bmm(hactiv.view(batch, n, 1), hidden.view(batch, 1, n))
            hebb = torch.clamp(hebb + da.view(batch, 1, 1) * deltahebb, min=-clip, max=clip)
            hidden = hactiv
            outputs.append(hactiv)
        return self.net.h2o(torch.stack(outputs))


def train(model, args, dev, iterations, name):
    """Trains on the episodes of ``args.seed``; returns per-iteration (loss, reward per episode) and
    seconds per iteration."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def step():
        x, go, answer = episodes(generator, args.batch, args.cues, args.cue_bits, args.steps)
        x, go, answer = x.to(dev), go.to(dev), answer.to(dev)
        logits = model(x)[go]
        loss = nn.functional.cross_entropy(logits, answer[go])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        right = (logits.detach().argmax(-1) == answer[go]).float()
        return loss, (2 * right - 1).sum() / args.batch

    return _common.train_loop(step, iterations, dev, args.report_every, name, "reward per episode", ".2f")


def build_parser():
    parser = _common.parser(__doc__, iterations=600, out="runs/cue_reward")
    parser.add_argument("--size", type=_common.positive_int, default=100, help="recurrent neurons (the paper: 200)")
    parser.add_argument("--cues", type=_common.positive_int, default=4, help="cues per episode")
    parser.add_argument("--cue-bits", type=_common.positive_int, default=20, help="bits per cue")
    parser.add_argument("--steps", type=_common.positive_int, default=120, help="steps per episode")
    parser.add_argument("--batch", type=_common.positive_int, default=30, help="episodes per iteration")
    parser.add_argument("--clip", type=_common.positive_float, default=1.0, help="bound on the Hebbian trace")
    parser.add_argument("--lr", type=_common.positive_float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--grad-clip", type=_common.positive_float, default=2.0, help="gradient norm bound")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="networks to train")
    _common.add_plastic_comparison(parser, "reward", eager_iterations=10)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cues < 2:
        parser.error(f"--cues: expected at least 2 (a trial shows half of them), got {args.cues}")
    dev = _common.setup(parser, args)
    wall = time.perf_counter()
    inputs = args.cue_bits + 5

    results = {}
    for k, kind in enumerate(args.kinds):
        torch.manual_seed(args.seed + k)
        net = CueRewardNetwork(inputs, args.size, kind, args.clip, dev)
        initial = {name: p.detach().clone() for name, p in net.state_dict().items()}
        results[kind] = train(net, args, dev, args.iterations, kind)
        if kind == "modulated":
            modulated_initial = initial

    every = args.report_every
    rows = []
    for i in range(0, args.iterations, every):
        row = {"iteration": min(i + every, args.iterations)}
        for kind, (loss, reward, _) in results.items():
            row[f"{kind}_reward"] = _common.block_means(reward, every)[i // every]
            row[f"{kind}_loss"] = _common.block_means(loss, every)[i // every]
        rows.append(row)
    _common.write_curve(args.out, rows, "iteration", [(f"{kind}_reward", kind) for kind in results],
                        "reward per episode (mean over the block)", "Cue-reward association (backpropamine)")

    eager, gap, e_sec = "", None, None
    if args.eager_iterations and "modulated" in results:
        k = min(args.eager_iterations, args.iterations)
        net = CueRewardNetwork(inputs, args.size, "modulated", args.clip, dev)
        net.load_state_dict(modulated_initial)
        e_loss, _, e_sec = train(PublishedLoop(net), args, dev, k, "published eager loop")
        m_loss, _, m_sec = results["modulated"]
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(e_loss, m_loss[:k]))
        eager = (f"; published eager loop {e_sec:.3f} s/iter over {k} iterations, {e_sec / m_sec:.1f}x slower, "
                 f"its losses within {gap:.1e} of ours")
    last_block = args.iterations - (len(rows) - 1) * every
    scores = ", ".join(f"{kind} {rows[-1][f'{kind}_reward']:.2f}" for kind in results)
    speed = ", ".join(f"{kind} {sec:.3f}" for kind, (_, _, sec) in results.items())
    line = (f"cue_reward: reward per episode over the last {last_block} of {args.iterations} iterations: {scores}; "
            f"s/iter on {dev.type} {speed} (backend {nf.backends.resolve('plastic', dev.type, torch.float32)})"
            f"{eager}; wall {time.perf_counter() - wall:.0f} s")
    _common.summarize(args.out, line)
    return {"rows": rows, "results": results, "eager_sec_per_iter": e_sec, "eager_loss_gap": gap}


if __name__ == "__main__":
    main()
