"""`python -m bench.launches`: the kernel launches of one call, on each GPU backend and in eager PyTorch,
counted on the CPU, and the time they imply on an H100.

At the sizes this field trains at, a GPU call costs its launches more than its flops. This tool
runs each case on CPU tensors, through the same Python launch path a GPU runs, and counts:

* **kernels**: our own launches. Triton: every launch goes through
  ``neuronml_fast/ops/_triton_launch.py`` ``launch``, whose `intercepted` hook records it (and runs
  it in the interpreter, or not at all, see *recorded* below). CUDA C++: the launches the emulation
  (``csrc/emu``) counts in ``emulation_state()["launches"]``, per call into the extension.
* **ATen**: the ATen ops around them that would launch a device kernel, counted by a
  ``TorchDispatchMode`` below autograd (an op as the device runs it). The rule: every op counts as
  one launch except (1) view and metadata ops (``func.is_view``, ``inplace_view`` ops such as
  ``squeeze_``, ``_unsafe_view``, ``detach``, ``alias``, ``lift_fresh``, shape queries: they only
  make a new tensor header), but an op that may return its input or a copy (``to``,
  ``contiguous``, ``reshape``) counts when it made new memory; (2) allocations whose memory is
  not written (``empty``, ``empty_strided``, ``new_empty``, ``empty_like``, ``resize_``, ``set_``); (3) host
  reads (``_local_scalar_dense``, what ``.item()``/``float()`` run), counted apart as **syncs**
  (a device-to-host copy that waits for the GPU, not a kernel). Ops the Triton interpreter runs to
  execute a kernel on the CPU are not counted (they do not exist on a GPU). Inside our own custom
  ops (``neuronml_fast::*``) the counter descends into the implementation, so the ops a launcher
  runs around its kernels count too. Fills, copies (``.contiguous()`` of a tensor that is not,
  ``.to(dtype)``), reductions, elementwise ops, sorts and factories that write (``zeros``) each
  count one. Some ATen ops launch more than one kernel on a GPU (cuDNN's convolution backward:
  the input, weight and bias gradients; ``select_backward``: a fill and a copy), so the rule
  undercounts eager PyTorch, never our path.
* **launches** = kernels + ATen: what a GPU would be asked to run.

**Recorded** paths (marked ``R``): where the kernels would take too long to run in the
interpreter or the emulation (the large cases; Triton in the meta-iterations), the launches are
counted with the kernels stubbed out: Triton's launch replaced by a recorder, the CUDA emulation
in ``count_only`` mode (each launch is checked and counted, no block runs). The launch path, and
every ATen op around the kernels, runs as it would; only the kernels' outputs are left
unwritten, and nothing on this path reads them on the host. The other paths run their kernels
(interpreted or emulated), and ``--check`` counts them recorded too, to show that the counts agree.

Every case's backward takes a given gradient of its output (made outside the count), so that
``.sum().backward()``'s own fill is not counted. A meta-iteration is forward and backward at once
(the inner loop differentiates inside the forward): one number, in the fwd+bwd column.

**GPU model** (``--model``, and in the JSON): per path, launches, bytes and flops, and the time
they imply on an H100 SXM:

    time = max(launches x 5 us,  bytes / 3.35 TB/s + flops / peak(dtype))

The launches are issued asynchronously, so the host's ~5 us per launch overlaps the GPU's work:
whichever is longer bounds the call. *bytes*: every launch moves the tensors it is handed (a
Triton kernel's tensor arguments, a CUDA extension call's, an ATen op's inputs, less those it
only writes, and its outputs),
each once (an expanded tensor counts its memory, not its elements); the compulsory traffic, a
lower bound. *flops*: matrix products and convolutions (``torch.utils.flop_counter``'s formulas
for eager; for our kernels the same products restricted to the active neurons: the masked
kernels skip pruned ones, the plastic kernels do eager's products); elementwise work is in the
bytes. *peak*: 67 TFLOP/s for float32 (the FMA units; where TF32 runs, for eager and for our GEMMs
alike, the flops take less: the model then overstates both times the same way) and float64 (tensor
cores), 989 TFLOP/s for float16/bfloat16.

Budgets: each case's ``budget`` is its fwd+bwd launches allowed on each GPU backend (``MASKED_BUDGET``,
``PLASTIC_BUDGET``); ``bench/tests/test_launches.py`` holds every case to it, so a change that adds
launches fails a test.

On a GPU (``--device cuda``, the ``launches`` step of ``make gpu-check``) the cases run on the
device instead: per path, the CUDA kernels one fwd+bwd launches (``torch.profiler``) and its
median time, beside this count (from a child process on CPU tensors) and the model's time.

Usage: ``python -m bench.launches [--cases PATTERN ...] [--json FILE] [--model] [--check] [--device cuda]``.
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GPU_BACKENDS = ("triton", "cuda")
LAUNCH_S = 5e-6
BANDWIDTH = 3.35e12
PEAK_FLOPS = {torch.float32: 67e12, torch.float64: 67e12, torch.float16: 989e12, torch.bfloat16: 989e12}

# fwd+bwd launches allowed on each GPU backend (issue 26).
MASKED_BUDGET = 6
PLASTIC_BUDGET = 8

# Whether the cases run on a GPU (--device cuda) rather than counted on CPU tensors.
_on_gpu = False


def _nf():
    """The package, imported with the GPU backends on CPU tensors (Triton in its interpreter, CUDA C++
    in the emulation) unless the cases run on a GPU. Both are chosen when the package (and triton)
    is first imported, so this module imports it only here: importing the module (for its cases
    and budgets) changes nothing."""
    if not _on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("NEURONML_FAST_CUDA_EMULATE", "1")
    import neuronml_fast

    return neuronml_fast


# ---- counting ------------------------------------------------------------------------------------

_NO_KERNEL = frozenset({
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "resize_", "set_", "_unsafe_view",
    "lift_fresh", "detach", "alias", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "is_contiguous", "_nested_tensor_size",
})
_SYNC = frozenset({"_local_scalar_dense"})


def tensor_bytes(t):
    """The memory a tensor addresses: its elements, but an expanded (stride 0) dimension once."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return 0
    return t.element_size() * math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _moved_bytes(reads, writes):
    """Bytes read and written, each tensor once (by its memory)."""
    seen, total = set(), 0
    for t in (*reads, *writes):
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def _flop_formulas():
    # Imported here: torch.utils.flop_counter imports triton, which must first see how `_nf` sets it up.
    from torch.utils.flop_counter import flop_registry

    return flop_registry


def _storages(values):
    return {t.untyped_storage().data_ptr() for t in _tensors(values) if t.numel()}


def launches_a_kernel(func, args, out):
    """The counter's rule (see the module docstring): whether an ATen op launched a device kernel."""
    name = func._schema.name.split("::")[-1]
    if name in _NO_KERNEL or name in _SYNC or torch.Tag.inplace_view in func.tags:
        return False
    if func.is_view:
        # Views, and the ops that return their input or else a copy (`to`, `contiguous` and
        # `reshape` reach here undecomposed below autograd, inside our custom ops): a kernel ran
        # when the result is new memory.
        fresh = _storages([out])
        return bool(fresh) and not fresh & _storages(args)
    return any("Tensor" in str(r.type) for r in func._schema.returns)


@dataclasses.dataclass
class Tally:
    """What one counted call launches."""

    kernels: int = 0
    aten: int = 0
    syncs: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    op_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def launched(self, what, nbytes, kernels=0):
        """One ATen op, or ``kernels`` launches of our own, named ``what``, moving ``nbytes``."""
        if kernels:
            self.kernels += kernels
        else:
            self.aten += 1
        self.ops[what] += max(kernels, 1)
        self.bytes += nbytes
        self.op_bytes[what] += nbytes

    @property
    def launches(self):
        return self.kernels + self.aten

    def add(self, other):
        self.kernels += other.kernels
        self.aten += other.aten
        self.syncs += other.syncs
        self.bytes += other.bytes
        self.flops += other.flops
        self.ops.update(other.ops)
        self.op_bytes.update(other.op_bytes)

    def as_dict(self):
        return {"launches": self.launches, "kernels": self.kernels, "aten": self.aten, "syncs": self.syncs,
                "bytes": self.bytes, "flops": self.flops, "ops": dict(sorted(self.ops.items())),
                "op_bytes": dict(sorted(self.op_bytes.items()))}


class AtenCounter(TorchDispatchMode):
    """Counts the ATen ops that would launch a device kernel (`launches_a_kernel`) into ``tally``."""

    def __init__(self, tally):
        super().__init__()
        self.tally = tally
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "neuronml_fast":  # our custom op: count what its implementation runs
            device = next(_tensors([*args, *kwargs.values()])).device
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func._schema.name.split("::")[-1]
        if name in _SYNC:
            self.tally.syncs += 1
            self.tally.ops[f"sync:{name}"] += 1
        elif launches_a_kernel(func, [*args, *kwargs.values()], out):
            written = {i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and
                       a.alias_info.is_write}
            reads = [a for i, a in enumerate(args) if i not in written]
            self.tally.launched(f"aten:{name}", _moved_bytes(list(_tensors([*reads, *kwargs.values()])),
                                                             list(_tensors([out]))))
            flops = _flop_formulas().get(func.overloadpacket)
            if flops is not None:
                self.tally.flops += flops(*args, **kwargs, out_val=out)
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


class KernelRecorder:
    """Counts our own launches (Triton's through `_triton_launch.intercepted`, the CUDA extension's
    through the emulation's counter) into ``tally``; runs them, or not when ``record_only``."""

    def __init__(self, tally, aten, record_only):
        self.tally, self.aten, self.record_only = tally, aten, record_only

    def triton(self, kernel, grid, args, kwargs):
        from neuronml_fast.ops import _triton_launch

        self.tally.launched(f"triton:{kernel.__name__}", _moved_bytes(list(_tensors(args)), []), kernels=1)
        if not self.record_only:
            with self.aten.pause(), _triton_launch.intercepted(None):
                _triton_launch.launch(kernel, grid, *args, **kwargs)

    @contextlib.contextmanager
    def installed(self):
        from neuronml_fast.ops import _triton_launch

        with _triton_launch.intercepted(self.triton), self._cuda_counted():
            yield

    @contextlib.contextmanager
    def _cuda_counted(self):
        from neuronml_fast import _extensions

        name = _extensions.cuda_name()
        module = _extensions.cuda() if _extensions.cuda_emulated() else None
        if module is None:
            yield
            return
        state = module.emulation_state()
        module.configure_emulation(count_only=self.record_only)
        _extensions._modules[name] = _CountedExtension(module, self.tally)
        try:
            yield
        finally:
            _extensions._modules[name] = module
            module.configure_emulation(count_only=state["count_only"])


class _CountedExtension:
    """The emulated CUDA extension, each call counted: the launches the emulation made during it,
    and (when it launched) the bytes of the tensors it was handed."""

    def __init__(self, module, tally):
        self._module, self._tally = module, tally

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr) or name.startswith(("emulation_", "configure_")):
            return attr
        module, tally = self._module, self._tally

        def counted(*args, **kwargs):
            before = module.emulation_state()["launches"]
            result = attr(*args, **kwargs)
            launched = module.emulation_state()["launches"] - before
            if launched:
                tally.launched(f"cuda:{name}", _moved_bytes(list(_tensors([*args, *kwargs.values()])), []),
                              kernels=launched)
            return result

        return counted


@contextlib.contextmanager
def counting(tally, record_only=False):
    """Everything launched inside the block, into ``tally``."""
    from neuronml_fast import _alloc

    aten = AtenCounter(tally)
    recorder = KernelRecorder(tally, aten, record_only)
    with _alloc.poisoned(False), recorder.installed(), aten:
        yield


# ---- cases ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One case ready to count: ``forward()`` returns the output to differentiate. ``useful_flops``:
    the matrix-product flops of our kernels' forward + backward (three equal products: forward,
    input gradient, weight gradient); None: the same as eager's."""

    forward: Callable
    useful_flops: Optional[float] = None
    iteration: bool = False  # a meta-iteration: forward() runs forward and backward


@dataclasses.dataclass
class Case:
    name: str
    family: str
    build: Callable  # (path, device) -> Run; path is "eager", "torch.func" or a GPU backend
    budget: Optional[int] = None  # fwd+bwd launches allowed on each GPU backend
    budget_xfail: str = ""  # why the budget is not met yet (the test marks it xfail)
    recorded: tuple = ()  # the GPU paths whose kernels are recorded instead of run (too slow to run on the CPU)
    paths: tuple = ("eager", *GPU_BACKENDS)
    dtype: torch.dtype = torch.float32


def _mask(channels, active, tasks, device):
    """round(active * channels) ones per task at random positions, zeros elsewhere."""
    gen = torch.Generator().manual_seed(0)
    shape = (channels,) if tasks is None else (tasks, channels)
    return (torch.rand(shape, generator=gen).argsort(-1) < round(active * channels)).float().to(device).requires_grad_()


def _leaves(device, *shapes, scale=1.0, dtype=torch.float32):
    """Leaf tensors of these shapes (std ``scale``), the same on every device."""
    gen = torch.Generator().manual_seed(0)
    return [(scale * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_() for shape in shapes]


def _masked_conv(tasks, n, c, hw, active):
    def build(path, device="cpu"):
        t = () if tasks is None else (tasks,)
        x, b = _leaves(device, (*t, n, c, hw, hw), (*t, c))
        w, = _leaves(device, (*t, c, c, 3, 3), scale=0.05)
        m = _mask(c, active, tasks, device)
        if path == "eager":  # F.conv2d(...) * mask, a Python loop over the tasks when batched
            def forward():
                if tasks is None:
                    return torch.nn.functional.conv2d(x, w, b, 1, 1) * m.view(1, -1, 1, 1)
                return torch.stack([torch.nn.functional.conv2d(x[i], w[i], b[i], 1, 1) * m[i].view(1, -1, 1, 1)
                                    for i in range(tasks)])
            return Run(forward)
        active_channels = round(active * c) * (tasks or 1)
        return Run(lambda: _nf().masked_conv2d(x, w, m, b, 1, 1),
                   useful_flops=3 * 2 * n * hw * hw * c * 9 * active_channels)

    return build


def _masked_linear(tasks, n, d_in, d_out, active):
    def build(path, device="cpu"):
        t = () if tasks is None else (tasks,)
        x, b = _leaves(device, (*t, n, d_in), (*t, d_out))
        w, = _leaves(device, (*t, d_out, d_in), scale=d_in ** -0.5)
        m = _mask(d_out, active, tasks, device)
        if path == "eager":
            def forward():
                if tasks is None:
                    return torch.nn.functional.linear(x, w, b) * m
                return torch.stack([torch.nn.functional.linear(x[i], w[i], b[i]) * m[i] for i in range(tasks)])
            return Run(forward)
        active_features = round(active * d_out) * (tasks or 1)
        return Run(lambda: _nf().masked_linear(x, w, m, b), useful_flops=3 * 2 * n * d_in * active_features)

    return build


def _plastic_rnn(steps, batch, n, clip=None, endogenous=False, dtype=torch.float32):
    """plastic_rnn with a learnable eta (0-d tensor), tanh; eager is the reference backend's autograd."""

    def build(path, device="cpu"):
        x, = _leaves(device, (steps, batch, n), scale=0.5, dtype=dtype)
        w, mod_weight = _leaves(device, (n, n), (n,), scale=n ** -0.5, dtype=dtype)
        a, = _leaves(device, (n, n), scale=0.1 * n ** -0.5, dtype=dtype)
        eta = torch.tensor(0.05, device=device, dtype=dtype, requires_grad=True)
        extra = {}
        if endogenous:
            extra = dict(mod_weight=mod_weight,
                         mod_bias=torch.zeros((), device=device, dtype=dtype, requires_grad=True))

        def forward():
            nf = _nf()
            with nf.use_backend("reference") if path == "eager" else contextlib.nullcontext():
                return nf.plastic_rnn(x, w, a, eta, clip=clip, **extra)[0]

        return Run(forward)

    return build


def _meta(algo, tasks=2, ways=2, hidden=8, image_size=28):
    """One meta-iteration of MAML or NeuronML (second order) on a small Conv4; eager is the reference
    learner (a Python loop over tasks), torch.func the vmap-of-grad MAML."""

    def build(path, device="cpu"):
        _nf()
        from neuronml_fast.meta import MAML, Conv4, NeuronML, functorch_maml
        from neuronml_fast.meta.tasks import random_episodes

        torch.manual_seed(0)
        model = Conv4(ways, hidden=hidden, image_size=image_size).to(device)
        batch = tuple(t.to(device) for t in random_episodes(tasks, ways, 1, 1, image_size=image_size))
        make = MAML if algo == "maml" else NeuronML
        learner = make(model, backend="reference" if path in ("eager", "torch.func") else "fused")
        if path == "torch.func":
            return Run(lambda: functorch_maml.meta_backward(learner, batch), iteration=True)
        return Run(lambda: learner.meta_backward(batch), iteration=True)

    return build


CONV_TASK = dict(n=80, c=64, hw=14)  # the Conv4-Omniglot block: 80 images, 64 -> 64 channels, 14x14
CASES = [
    Case("masked_conv2d 64->64 3x3, one task", "masked", _masked_conv(None, **CONV_TASK, active=0.5),
         budget=MASKED_BUDGET, recorded=GPU_BACKENDS),
    Case("masked_conv2d 64->64 3x3, 32 tasks", "masked", _masked_conv(32, n=16, c=64, hw=14, active=0.5),
         budget=MASKED_BUDGET, recorded=GPU_BACKENDS),
    Case("masked_linear 256->128", "masked", _masked_linear(None, n=256, d_in=256, d_out=128, active=0.5),
         budget=MASKED_BUDGET, recorded=GPU_BACKENDS),
    Case("masked_conv2d 8->8 3x3, 3 tasks (runs)", "masked", _masked_conv(3, n=2, c=8, hw=5, active=0.5),
         budget=MASKED_BUDGET),
    Case("masked_linear 12->9, 2 tasks (runs)", "masked", _masked_linear(2, n=3, d_in=12, d_out=9, active=0.5),
         budget=MASKED_BUDGET),
    *[Case(name, "plastic", build, budget=PLASTIC_BUDGET, recorded=GPU_BACKENDS, dtype=dtype)
      for name, build, dtype in (
          ("plastic_rnn T=100 N=64 hebb", _plastic_rnn(100, 1, 64), torch.float32),
          ("plastic_rnn T=100 N=256 hebb", _plastic_rnn(100, 1, 256), torch.float32),
          ("plastic_rnn T=106 N=1001 B=1 hebb (Miconi)", _plastic_rnn(106, 1, 1001), torch.float32),
          ("plastic_rnn T=100 N=64 clip 1", _plastic_rnn(100, 1, 64, clip=1.0), torch.float32),
          ("plastic_rnn T=120 N=100 B=30 endogenous clip 1 (backpropamine)",
           _plastic_rnn(120, 30, 100, clip=1.0, endogenous=True), torch.float32),
          ("plastic_rnn T=100 N=256 hebb bfloat16", _plastic_rnn(100, 1, 256, dtype=torch.bfloat16),
           torch.bfloat16),
          ("plastic_rnn T=120 N=100 B=30 endogenous clip 1 float16",
           _plastic_rnn(120, 30, 100, clip=1.0, endogenous=True, dtype=torch.float16), torch.float16),
      )],
    Case("MAML meta-iteration, Conv4 hidden 8, 2 tasks x 2 ways", "meta", _meta("maml"), recorded=("triton",),
         paths=("eager", "torch.func", *GPU_BACKENDS)),
    Case("NeuronML meta-iteration, Conv4 hidden 8, 2 tasks x 2 ways", "meta", _meta("neuronml"), recorded=("triton",)),
]


def select(patterns=None):
    return [c for c in CASES if not patterns or any(p in c.name for p in patterns)]


# ---- running -------------------------------------------------------------------------------------


def available_paths(case):
    usable = set(_nf().backends.available())
    return [p for p in case.paths if p in ("eager", "torch.func") or p in usable]


def count(case, path, record_only=None):
    """{"fwd": Tally or None, "fwd+bwd": Tally} of one case on one path."""
    nf = _nf()
    record_only = path in case.recorded if record_only is None else record_only
    run = case.build(path)
    backend = contextlib.nullcontext() if path in ("eager", "torch.func") else nf.use_backend(path)
    fwd, bwd = Tally(), Tally()
    with backend:
        with counting(fwd, record_only=record_only):
            out = run.forward()
        if run.iteration:
            return {"fwd": None, "fwd+bwd": fwd, "useful_flops": False}
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        with counting(bwd, record_only=record_only):
            torch.autograd.backward(out, grad)
    total = Tally()
    total.add(fwd)
    total.add(bwd)
    if run.useful_flops is not None:
        fwd.flops, total.flops = run.useful_flops / 3, run.useful_flops
    return {"fwd": fwd, "fwd+bwd": total, "useful_flops": run.useful_flops is not None}


def model_seconds(tally, dtype=torch.float32):
    """The H100 time a call's launches, bytes and flops imply (the module docstring's model)."""
    return max(tally.launches * LAUNCH_S, tally.bytes / BANDWIDTH + tally.flops / PEAK_FLOPS[dtype])


def measure(cases, check=False):
    import time

    rows = []
    for case in cases:
        start = time.monotonic()
        row = {"case": case.name, "family": case.family, "recorded": list(case.recorded), "budget": case.budget,
               "budget_xfail": case.budget_xfail, "paths": {}}
        eager = None
        for path in available_paths(case):
            counts = count(case, path)
            useful = counts.pop("useful_flops")
            if path == "eager":
                eager = counts
            elif not useful and eager is not None:  # our kernels run eager's products
                for k, tally in counts.items():
                    if tally is not None:
                        tally.flops = eager[k].flops
            row["paths"][path] = {k: None if v is None else {**v.as_dict(), "model_us": model_seconds(v) * 1e6}
                                  for k, v in counts.items()}
            if check and path in GPU_BACKENDS and path not in case.recorded:
                recorded = count(case, path, record_only=True)
                recorded.pop("useful_flops")
                row["paths"][path]["recorded_agrees"] = all(
                    (recorded[k] is None and counts[k] is None) or recorded[k].launches == counts[k].launches
                    for k in counts)
        rows.append(row)
        print(f"counted in {time.monotonic() - start:.1f} s: {case.name}", file=sys.stderr, flush=True)
    return rows


# ---- on a GPU: the profiler's kernel count and the time, beside the CPU count (make gpu-check) -----


def _cuda_events(fn):
    """(kernels, memory copies and sets) the CUDA profiler sees while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name() for e in prof.profiler.kineto_results.events()
             if e.device_type() == torch.autograd.DeviceType.CUDA]
    copies = sum(name.startswith(("Memcpy", "Memset")) for name in names)
    return len(names) - copies, copies


def _gpu_step(run, device):
    """One forward + backward (or meta-iteration) of a built case, its output gradient made once."""
    grad = []

    def step():
        out = run.forward()
        if run.iteration:
            return
        if not grad:
            grad.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device))
        torch.autograd.backward(out, grad[0])

    return step


def measure_gpu(cases, cpu_rows, budget_s, repeats=5, report=None):
    """Per case and path on the GPU: the CUDA kernels one fwd+bwd launches (profiler) and its median
    time, beside the counter's CPU figures (``cpu_rows``: {case: row}) and the model's time. Each
    row goes to ``report`` as soon as it is measured (a run cut short keeps what it measured)."""
    import time

    nf = _nf()
    device = torch.device("cuda")
    deadline = time.monotonic() + budget_s
    usable = set(nf.backends.available())
    rows = []
    for case in cases:
        cpu = cpu_rows.get(case.name, {}).get("paths", {})
        for path in [p for p in case.paths if p in ("eager", "torch.func") or p in usable]:
            row = {"case": case.name, "path": path, "cpu": (cpu.get(path) or {}).get("fwd+bwd")}
            if time.monotonic() > deadline:
                row["skipped"] = f"the {budget_s:.0f} s budget is spent"
            else:
                try:
                    row.update(_measure_on_gpu(case, path, device, repeats))
                except Exception as exc:  # noqa: BLE001 (reported, and the run fails; the other paths still run)
                    row["failed"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            if report:
                report(gpu_row(row))
    return rows


def _measure_on_gpu(case, path, device, repeats):
    import time

    nf = _nf()
    with contextlib.nullcontext() if path in ("eager", "torch.func") else nf.use_backend(path):
        step = _gpu_step(case.build(path, device), device)
        step()  # compiles (Triton) and warms the allocator
        torch.cuda.synchronize()
        kernels, copies = _cuda_events(step)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"cuda_kernels": kernels, "cuda_copies": copies, "median_us": sorted(times)[len(times) // 2] * 1e6}


GPU_HEAD = ["case", "path", "CPU count", "CUDA kernels (profiler)", "copies", "measured us", "H100 model us"]


def gpu_row(r):
    cpu = r["cpu"] or {}
    model = f"{cpu['model_us']:.0f}" if cpu else "-"
    for why in ("skipped", "failed"):
        if why in r:
            return f"| {r['case']} | {r['path']} | {cpu.get('launches', '-')} | {why}: {r[why]} | | | {model} |"
    return (f"| {r['case']} | {r['path']} | {cpu.get('launches', '-')} | {r['cuda_kernels']} | {r['cuda_copies']} | "
            f"{r['median_us']:.0f} | {model} |")


def gpu_table(rows):
    lines = ["| " + " | ".join(GPU_HEAD) + " |", "|---|---|" + "---:|" * (len(GPU_HEAD) - 2)]
    return "\n".join(lines + [gpu_row(r) for r in rows])


def _cpu_counts_in_a_child(names, timeout_s):
    """The CPU counter's rows for these cases, from a child process (it needs the Triton interpreter,
    which this process, running Triton on the GPU, must not load); {} when it fails."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cpu.json")
        env = {**os.environ, "TRITON_INTERPRET": "1", "NEURONML_FAST_CUDA_EMULATE": "1", "CUDA_VISIBLE_DEVICES": ""}
        try:
            subprocess.run([sys.executable, "-m", "bench.launches", "--json", out, "--cases", *names], env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=timeout_s,
                           check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                return {row["case"]: row for row in json.load(f)["rows"]}
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"the CPU count failed: {exc}", file=sys.stderr)
            return {}


def main_gpu(args, cases):
    global _on_gpu
    _on_gpu = True
    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 1
    cpu_rows = _cpu_counts_in_a_child([c.name for c in cases], timeout_s=args.budget / 2)
    print(f"{torch.cuda.get_device_name(0)}: one fwd+bwd; CPU count = the counter's launches on CPU tensors\n")
    print(gpu_table([]), flush=True)
    rows = measure_gpu(cases, cpu_rows, budget_s=args.budget / 2, report=lambda line: print(line, flush=True))
    failed = [f"{r['case']} on {r['path']}" for r in rows if "failed" in r]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ---- report --------------------------------------------------------------------------------------


def _cell(entry, key):
    if entry is None or entry.get(key) is None:
        return "-"
    return str(entry[key]["launches"])


def launch_table(rows):
    paths = [p for p in ("eager", "torch.func", *GPU_BACKENDS) if any(p in r["paths"] for r in rows)]
    head = ["case"] + [f"{p} {k}" for p in paths for k in ("fwd", "fwd+bwd")] + ["budget"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        name = r["case"] + (f" (R: {', '.join(r['recorded'])})" if r["recorded"] else "")
        cells = [_cell(r["paths"].get(p), k) for p in paths for k in ("fwd", "fwd+bwd")]
        budget = "-" if r["budget"] is None else f"<= {r['budget']}" + (" (xfail)" if r["budget_xfail"] else "")
        lines.append("| " + " | ".join([name, *cells, budget]) + " |")
    return "\n".join(lines)


def model_table(rows):
    head = ["case", "path", "launches", "kernels", "ATen", "syncs", "MB", "GFLOP", "H100 model us"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        for path, entry in r["paths"].items():
            t = entry["fwd+bwd"]
            lines.append(f"| {r['case']} | {path} | {t['launches']} | {t['kernels']} | {t['aten']} | {t['syncs']} | "
                         f"{t['bytes'] / 1e6:.2f} | {t['flops'] / 1e9:.3f} | {t['model_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", help="substrings of case names (default: all)")
    p.add_argument("--json", help="write the counts (with each path's ops) to this file")
    p.add_argument("--model", action="store_true", help="also print the GPU model table")
    p.add_argument("--check", action="store_true", help="also count the run cases recorded; exit 1 if they differ")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: run the cases on the GPU, count their CUDA kernels with the profiler and time them, "
                        "beside the CPU count (from a child process)")
    p.add_argument("--budget", type=float, default=240.0, help="--device cuda: seconds for the whole run")
    args = p.parse_args(argv)
    cases = select(args.cases)
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if args.device == "cuda":
        return main_gpu(args, cases)
    # The counts do not depend on the CPU's threads; one thread keeps the eager runs quick on a shared machine.
    torch.set_num_threads(1)
    rows = measure(cases, check=args.check)
    print(launch_table(rows))
    print("\n(R: paths): counted with those paths' kernels recorded instead of run; launches = kernels + ATen ops.")
    if args.model:
        print("\nGPU model (fwd+bwd; H100: max(launches x 5 us, bytes / 3.35 TB/s + flops / peak)):\n")
        print(model_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"launch_s": LAUNCH_S, "bandwidth": BANDWIDTH, "rows": rows}, f, indent=1)
    disagree = [r["case"] for r in rows for e in r["paths"].values() if e.get("recorded_agrees") is False]
    if disagree:
        print(f"recorded and run counts differ: {disagree}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
