"""The one list of benchmark cases, shared by `python -m bench` and `pytest bench/`.

A case builds its inputs on a device and names three things: the eager PyTorch baseline
(`reference`), the neuronml_fast call (`fused`, run under each kernel backend), and how one
iteration runs them (`step`: forward, or forward+backward). The runner adds the torch.compile
baseline and the backends. `flops` and `nbytes` give the case's roofline; its working set
(`Setup.working_set`) sizes the bandwidth ceiling it is compared with (see ceilings.py).
"""

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

import neuronml_fast as nf
from neuronml_fast.ops.sensitivity import neuron_sensitivity_reference


@dataclasses.dataclass
class Setup:
    reference: Callable
    fused: Callable
    inputs: list  # input tuples, rotated through so caches do not flatter the kernels
    flops: float
    nbytes: float
    dtype: str = "float32"
    step: Callable = None  # step(fn, inputs) -> Any; default: fn(*inputs)
    extras: dict = dataclasses.field(default_factory=dict)  # more baselines: {name: fn}, run like reference
    # Bytes an iteration keeps coming back to, where that differs from the traffic over all input
    # copies (a recurrent state re-read every step); sizes the bandwidth ceiling's probe.
    resident_bytes: float = None
    # The case's own GEMMs as (M, K, N): the matmul ceiling is probed at these shapes too, so a
    # library kernel that favours them cannot pass it (ceilings.py).
    gemm_shapes: list = dataclasses.field(default_factory=list)

    @property
    def working_set(self):
        if self.resident_bytes is not None:
            return self.resident_bytes
        return self.nbytes * len(self.inputs)

    def run(self, fn, i):
        inputs = self.inputs[i % len(self.inputs)]
        return self.step(fn, inputs) if self.step else fn(*inputs)


@dataclasses.dataclass
class Case:
    family: str
    name: str
    build: Callable[[torch.device], Setup]
    params: dict
    full_only: bool = False
    compile_baseline: bool = True  # False where compiling the eager loop would take minutes

    @property
    def id(self):
        return f"{self.family}/{self.name}"


def _rotations(nbytes_per_set, device):
    """Enough input copies to stream past the last-level cache (CPU) or L2 (GPU)."""
    budget = (64 << 20) if device.type == "cpu" else (256 << 20)
    return max(1, min(8, budget // max(nbytes_per_set, 1)))


def _sensitivity_case(name, shape, bias=True, full_only=False):
    def build(device):
        numel = torch.Size(shape).numel()
        nbytes = 2 * numel * 4 + (2 * shape[0] * 4 if bias else 0) + shape[0] * 4
        sets = []
        for _ in range(_rotations(nbytes, device)):
            w, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
            b, gb = (torch.randn(shape[0], device=device), torch.randn(shape[0], device=device)) if bias else (None, None)
            sets.append((w, g, b, gb))
        return Setup(neuron_sensitivity_reference, nf.neuron_sensitivity, sets, flops=2 * numel, nbytes=nbytes)

    return Case("neuron_sensitivity", name, build, {"shape": list(shape), "bias": bias}, full_only)


def forward_backward(fn, inputs):
    """One training step of a layer: forward, then backward of a gradient shaped like the output."""
    out = fn(*inputs)
    out.backward(torch.ones_like(out))


def forward_only(fn, inputs):
    with torch.no_grad():
        return fn(*inputs)


def _mask(channels, active, tasks=None, seed=0):
    """A mask with round(active * channels) ones per task at random positions, zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    shape = (channels,) if tasks is None else (tasks, channels)
    keep = torch.rand(shape, generator=gen).argsort(-1) < round(active * channels)
    return keep.float()


def _eager_masked_conv(x, w, b, m):
    # The baseline a user would write: F.conv2d(...) * mask (a Python loop over tasks when batched).
    if x.dim() == 5:
        return torch.stack([F.conv2d(x[t], w[t], b[t], 1, 1) * m[t].view(1, -1, 1, 1) for t in range(x.shape[0])])
    return F.conv2d(x, w, b, 1, 1) * m.view(1, -1, 1, 1)


def _fused_masked_conv(x, w, b, m):
    return nf.masked_conv2d(x, w, m, b, 1, 1)


def _masked_conv_case(name, n, c, hw, active, tasks=None, backward=True, channels_last=False, full_only=False):
    def build(device):
        t = () if tasks is None else (tasks,)
        x = torch.randn(*t, n, c, hw, hw, device=device)
        if channels_last:  # eager and fused alike get the channels_last input
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(*t, c, c, 3, 3, device=device) * 0.05
        b = torch.randn(*t, c, device=device)
        m = _mask(c, active, tasks).to(device)
        for p in (x, w, b, m) if backward else ():
            p.requires_grad_()
        count = max(tasks or 1, 1)
        flops = 2 * count * n * c * c * 9 * hw * hw * active * (3 if backward else 1)
        nbytes = 4 * count * (n * c * hw * hw * (4 if backward else 2) + c * c * 9)
        # im2col GEMMs of one task (3x3, stride 1, padding 1): the forward, every channel and the active ones.
        gemms = [(n * hw * hw, c * 9, c), (n * hw * hw, c * 9, max(1, round(c * active)))]
        return Setup(_eager_masked_conv, _fused_masked_conv, [(x, w, b, m)], flops=flops, nbytes=nbytes,
                     step=forward_backward if backward else forward_only, gemm_shapes=gemms)

    params = {"n": n, "c": c, "hw": hw, "active": active, "tasks": tasks, "backward": backward,
              "layout": "channels_last" if channels_last else "contiguous"}
    return Case("masked_conv2d", name, build, params, full_only, compile_baseline=tasks is None)


def _eager_masked_linear(x, w, b, m):
    if w.dim() == 3:
        return torch.stack([F.linear(x[t], w[t], b[t]) * m[t] for t in range(w.shape[0])])
    return F.linear(x, w, b) * m


def _fused_masked_linear(x, w, b, m):
    return nf.masked_linear(x, w, m, b)


def _masked_linear_case(name, n, d, active, tasks=None, full_only=False):
    def build(device):
        t = () if tasks is None else (tasks,)
        x = torch.randn(*t, n, d, device=device)
        w = torch.randn(*t, d, d, device=device) / d**0.5
        b = torch.randn(*t, d, device=device)
        m = _mask(d, active, tasks).to(device)
        for p in (x, w, b, m):
            p.requires_grad_()
        count = tasks or 1
        return Setup(_eager_masked_linear, _fused_masked_linear, [(x, w, b, m)],
                     flops=6 * count * n * d * d * active, nbytes=4 * count * (4 * n * d + d * d),
                     step=forward_backward, gemm_shapes=[(n, d, d), (n, d, max(1, round(d * active)))])

    return Case("masked_linear", name, build, {"n": n, "d": d, "active": active, "tasks": tasks}, full_only,
                compile_baseline=tasks is None)


def published_plastic_rnn(x, w_pre_post, alpha_pre_post, eta, rule="hebb", modulation=None, clip=None):
    """The plastic RNN as the published code writes it (Miconi et al. 2018, simple.py; backpropamine's
    batched step): row vectors, ``w`` and ``alpha`` stored ``[pre, post]``, one batched matmul per
    step for the recurrent input and one for the trace's outer product. The strongest eager
    formulation a user would write, so the eager baseline. Returns the outputs ``[T, B, N]``."""
    steps, batch, n = x.shape
    y = x.new_zeros(batch, n)
    hebb = x.new_zeros(batch, n, n)  # [B, pre, post]
    outputs = []
    for t in range(steps):
        y_new = torch.tanh(y.unsqueeze(1).bmm(w_pre_post + alpha_pre_post * hebb).squeeze(1) + x[t])
        if modulation is not None:
            hebb = hebb + modulation[t][:, None, None] * torch.bmm(y.unsqueeze(2), y_new.unsqueeze(1))
        elif rule == "hebb":
            hebb = (1 - eta) * hebb + eta * torch.bmm(y.unsqueeze(2), y_new.unsqueeze(1))
        else:  # Oja's rule, as the published maze code writes it
            hebb = hebb + eta * (y.unsqueeze(2) - hebb * y_new.unsqueeze(1)) * y_new.unsqueeze(1)
        if clip is not None:  # the published code's clamp of the trace
            hebb = hebb.clamp(-clip, clip)
        outputs.append(y_new)
        y = y_new
    return torch.stack(outputs)


def _plastic_case(name, batch, n, steps, rule="hebb", modulation=False, clip=None, full_only=False):
    def build(device):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(steps, batch, n, generator=gen) * 0.1).to(device)
        w = (torch.randn(n, n, generator=gen) * 0.01).to(device).requires_grad_()
        a = (torch.randn(n, n, generator=gen) * 0.01).to(device).requires_grad_()
        eta = torch.tensor(0.01, device=device, requires_grad=True)
        mod = (torch.randn(steps, batch, generator=gen) * 0.1).to(device) if modulation else None
        # The published code holds its weights [pre, post]: the same values, stored that way once
        # (as its user would), not transposed on every call.
        w_pre_post = w.detach().t().contiguous().requires_grad_()
        a_pre_post = a.detach().t().contiguous().requires_grad_()

        def eager(x, w, a, eta):
            return published_plastic_rnn(x, w_pre_post, a_pre_post, eta, rule, mod, clip)

        def fused(x, w, a, eta):
            return nf.plastic_rnn(x, w, a, eta, modulation=mod, rule=rule, clip=clip)[0]

        trace = batch * n * n
        # Lower bound of the traffic: the trace read and written once per step.
        # The trace stays in cache from step to step when it fits, so its size sets the ceiling.
        resident = 4 * (trace + 2 * n * n + 2 * batch * n)
        return Setup(eager, fused, [(x, w, a, eta)], flops=steps * trace * 30, nbytes=steps * trace * 4 * 2,
                     step=forward_backward, resident_bytes=resident)

    params = {"batch": batch, "n": n, "steps": steps, "rule": rule, "modulation": modulation, "clip": clip}
    # torch.compile of the eager loop unrolls T steps: minutes of compilation, so no baseline.
    return Case("plastic_rnn", name, build, params, full_only, compile_baseline=False)


def _meta_case(name, algo, first_order=False, tasks=32, ways=5, queries=15, active=None, full_only=False):
    """One meta-iteration (inner loop, query loss, meta-gradient) of the reference meta-learner.

    eager = the reference loop over tasks (plain PyTorch, one backward per task); the kernel
    backends run the fused task-batched learner; for MAML the peers are extra variants:
    "torch.func" = vmap of grad over tasks, and "higher" and "torchopt" where installed
    (bench/peers.py). NeuronML starts from a structure with ``active`` of the neurons on.
    Synthetic 28x28 images: the timing does not depend on the pixels.
    """
    from neuronml_fast.meta import MAML, Conv4, NeuronML
    from neuronml_fast.meta import functorch_maml
    from neuronml_fast.meta.tasks import random_episodes

    from . import peers

    def build(device):
        batch = tuple(part.to(device) for part in random_episodes(tasks, ways, 1, queries))
        options = {} if algo == "maml" else {"target_active": active}
        make = MAML if algo == "maml" else NeuronML

        def learner(backend):
            torch.manual_seed(0)
            return make(Conv4(ways).to(device), backend=backend, first_order=first_order, **options)

        def iteration(learner):
            def run(*batch):
                learner.module.zero_grad(set_to_none=True)
                return learner.meta_backward(batch)
            return run

        reference, fused = learner("reference"), learner("fused")
        extras = {}
        if algo == "maml":
            vmapped = learner("reference")

            def torch_func(*batch):
                vmapped.module.zero_grad(set_to_none=True)
                return functorch_maml.meta_backward(vmapped, batch)

            extras["torch.func"] = torch_func
            for peer, meta_backward in peers.available().items():
                peer_learner = learner("reference")

                def run_peer(*batch, peer_learner=peer_learner, meta_backward=meta_backward):
                    peer_learner.module.zero_grad(set_to_none=True)
                    with nf.use_backend("reference"):
                        return meta_backward(peer_learner, batch)

                extras[peer] = run_peer
        # Forward + backward of the query convs dominate: ~3x the forward conv FLOPs of the query set.
        model = reference.model
        flops, size, gemms = 0.0, 28, []
        for conv in model.convs:
            size = (size + 1) // 2
            flops += 2 * conv.in_channels * conv.out_channels * 9 * size * size
            gemms.append((ways * (queries + 1) * size * size, conv.in_channels * 9, conv.out_channels))
        flops *= 3 * tasks * ways * (queries + 1)
        return Setup(iteration(reference), iteration(fused), [batch], flops=flops,
                     nbytes=4 * tasks * ways * (queries + 1) * 64 * 14 * 14 * 8, extras=extras, gemm_shapes=gemms)

    params = {"algo": algo, "tasks": tasks, "ways": ways, "shots": 1, "queries": queries, "first_order": first_order,
              "active": 1.0 if algo == "maml" else active}
    return Case("meta_iteration", name, build, params, full_only, compile_baseline=False)


CONV4 = dict(n=80, c=64, hw=14)  # the Conv4-Omniglot block: 80 images, 64 -> 64 channels, 14x14

CASES = [
    _sensitivity_case("conv4 64x64x3x3", (64, 64, 3, 3)),
    _sensitivity_case("resnet 512x512x3x3", (512, 512, 3, 3)),
    _sensitivity_case("linear 4096x4096", (4096, 4096), bias=True),
    _sensitivity_case("head 5x1600", (5, 1600)),
    _sensitivity_case("linear 16384x4096", (16384, 4096), full_only=True),
    *[_masked_conv_case(f"conv4 fwd+bwd active={a:.0%}", **CONV4, active=a) for a in (1.0, 0.75, 0.5, 0.25)],
    *[_masked_conv_case(f"conv4 fwd active={a:.0%}", **CONV4, active=a, backward=False) for a in (1.0, 0.5)],
    # The cases above take a contiguous (NCHW) input, as a classic model's first layer does; these a
    # channels_last one (the output then is channels_last too: PyTorch's conv2d layout rule).
    _masked_conv_case("conv4 channels_last fwd+bwd active=25%", **CONV4, active=0.25, channels_last=True),
    _masked_conv_case("conv4 channels_last fwd active=100%", **CONV4, active=1.0, backward=False, channels_last=True),
    *[_masked_conv_case(f"32 tasks x 16 img fwd+bwd active={a:.0%}", n=16, c=64, hw=14, active=a, tasks=32)
      for a in (1.0, 0.5)],
    *[_masked_linear_case(f"256x1024 fwd+bwd active={a:.0%}", n=256, d=1024, active=a) for a in (1.0, 0.5)],
    _masked_linear_case("32 tasks x 75x256 fwd+bwd active=50%", n=75, d=256, active=0.5, tasks=32),
    _plastic_case("B=16 N=256 T=100 hebb fwd+bwd", 16, 256, 100),
    # The same with the trace clipped: no longer invertible, so the backward recomputes it.
    _plastic_case("B=16 N=256 T=100 hebb clip=0.05 fwd+bwd", 16, 256, 100, clip=0.05),
    _plastic_case("B=1 N=1000 T=106 hebb fwd+bwd (Miconi)", 1, 1000, 106),
    _plastic_case("B=16 N=128 T=100 modulated fwd+bwd", 16, 128, 100, modulation=True),
    _plastic_case("B=16 N=64 T=200 oja fwd+bwd", 16, 64, 200, rule="oja"),
    # Finn et al.'s Omniglot set-up: 1 support and 1 query image per class.
    _meta_case("maml omniglot 5w1s meta-batch 32, 1 query, 2nd order", "maml", queries=1),
    _meta_case("maml omniglot 5w1s meta-batch 32, 15 queries, 2nd order", "maml"),
    _meta_case("maml omniglot 5w1s meta-batch 32, 15 queries, 1st order", "maml", first_order=True, full_only=True),
    # NeuronML's frugality: the same meta-iteration with 100 / 75 / 50 / 25 % of the neurons on, beside
    # MAML's (every neuron on) above.
    *[_meta_case(f"neuronml omniglot 5w1s meta-batch 32, 15 queries, 2nd order, active={a:.0%}", "neuronml",
                 active=a) for a in (1.0, 0.75, 0.5, 0.25)],
]


def select(patterns=None, full=False):
    """Cases whose id contains any of the patterns (all by default); --full adds the long ones."""
    chosen = [c for c in CASES if full or not c.full_only]
    if patterns:
        chosen = [c for c in chosen if any(p in c.id for p in patterns)]
    return chosen

