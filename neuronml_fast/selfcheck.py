"""Self-check: every usable backend against the float64 reference, `python -m neuronml_fast check`.

The first thing to run on a new machine (a GPU box, a fresh build): for every backend that can
run here, on each of its devices, it runs small cases of every registered op, forward and
gradients of every differentiable input (second order where MAML takes it), in every dtype the
backend registers for the op, and compares them with the op's reference evaluated in float64 on
the CPU, on the same inputs rounded to the dtype. Kernel outputs are NaN-poisoned (`_alloc`), so
an element a kernel forgets to write fails instead of passing by luck.

Error of one tensor: ``max|got - ref| / (atol + rtol * max|ref|)``, a scaled error that passes at
<= 1. Scaling by the largest reference value (not element-wise) makes a sum of many rounded terms
pass where its own rounding allows, while a wrong element of the size of the data still fails.

The case table (`CASES`), the tolerances (`TOLERANCES`) and the runner (`check_case`,
`run`) are plain data and functions, for a test harness to reuse.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import neuronml_fast as nf
from neuronml_fast import _alloc, _outputs, _precision, backends
from neuronml_fast.ops.plastic import checkpoint_every
from neuronml_fast.ops.masked import masked_conv2d_reference, masked_linear_reference
from neuronml_fast.ops.plastic import plastic_linear_reference, plastic_rnn_reference
from neuronml_fast.ops.sensitivity import neuron_sensitivity_reference

F64 = torch.float64

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_DTYPE_ALIASES = {**{v: k for k, v in DTYPE_NAMES.items()},
                  **{str(k).replace("torch.", ""): k for k in DTYPE_NAMES}, "half": torch.float16}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to the largest reference value of the tensor
    atol: float

    def scaled_error(self, max_abs_error, max_abs_reference):
        return max_abs_error / (self.atol + self.rtol * max_abs_reference)


# Kernels accumulate in float32 (float64 for float64): the error is the rounding of the inputs' own
# dtype over a few operations. The low-precision tolerances leave room for second-order gradients,
# which round the first-order gradient before differentiating it again.
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-6),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-4),
    torch.bfloat16: Tolerance(rtol=5e-2, atol=1e-3),
}


# ---- the cases -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One small problem of one public op, run by each backend and by the float64 reference.

    ``inputs(gen)`` returns float64 CPU tensors by argument name (None: argument left out); each
    becomes a leaf that requires grad. ``function`` and ``reference`` are called with
    ``**inputs, **options`` and return a tensor or a tuple named by ``outputs``.
    """

    function: str  # public op, e.g. "masked_conv2d"
    name: str  # what the case covers
    kernels: tuple  # registered ops (nf.backends.ops()) the case runs
    inputs: Callable[[torch.Generator], dict]
    reference: Callable
    options: dict = dataclasses.field(default_factory=dict)
    outputs: tuple = ("out",)
    second_order: bool = False  # also differentiate the gradients (MAML's meta-gradient)
    quick: bool = False  # part of --quick
    devices: frozenset = frozenset({"cpu", "cuda"})  # tile-sized cases: GPU only

    @property
    def call(self):
        return getattr(nf, self.function)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=F64) * scale


def _mask(gen, *shape, every=3):
    """Positive gains in [0.5, 1.5) with every ``every``-th neuron pruned (exact 0), shifted per task."""
    mask = torch.rand(shape, generator=gen, dtype=F64) + 0.5
    neurons = torch.arange(shape[-1])
    for index in range(math.prod(shape[:-1])):
        row = mask.view(-1, shape[-1])[index]
        row[(neurons + index) % every == 0] = 0.0
    return mask


def _conv(tasks, n, c_in, c_out, hw, k, groups=1, bias=True, every=3):
    t = () if tasks is None else (tasks,)

    def inputs(gen):
        return dict(input=_randn(gen, *t, n, c_in, *hw),
                    weight=_randn(gen, *t, c_out, c_in // groups, *k, scale=(c_in // groups * k[0] * k[1]) ** -0.5),
                    mask=_mask(gen, *t, c_out, every=every),
                    bias=_randn(gen, *t, c_out) if bias else None)

    return inputs


def _linear(tasks, lead, d_in, d_out, bias=True, every=3):
    t = () if tasks is None else (tasks,)

    def inputs(gen):
        return dict(input=_randn(gen, *t, *lead, d_in), weight=_randn(gen, *t, d_out, d_in, scale=d_in ** -0.5),
                    mask=_mask(gen, *t, d_out, every=every), bias=_randn(gen, *t, d_out) if bias else None)

    return inputs


def _sensitivity(shape, bias=True, channels_last=False):
    def inputs(gen):
        weight, grad = _randn(gen, *shape), _randn(gen, *shape)
        if channels_last:
            weight, grad = (t.contiguous(memory_format=torch.channels_last) for t in (weight, grad))
        return dict(weight=weight, grad_weight=grad, bias=_randn(gen, shape[0]) if bias else None,
                    grad_bias=_randn(gen, shape[0]) if bias else None)

    return inputs


def _plastic_linear(T, B, d_in, d_out, eta=0.1, alpha_scalar=False):
    def inputs(gen):
        return dict(input=_randn(gen, T, B, d_in), weight=_randn(gen, d_out, d_in, scale=0.3),
                    alpha=_randn(gen, scale=0.3) if alpha_scalar else _randn(gen, d_out, d_in, scale=0.3),
                    eta=torch.tensor(eta, dtype=F64), hebb=_randn(gen, B, d_out, d_in, scale=0.1),
                    bias=_randn(gen, d_out), drive=_randn(gen, T, B, d_out))

    return inputs


def _plastic_rnn(T, B, N, eta=0.2, modulation=None):
    def inputs(gen):
        args = dict(input=_randn(gen, T, B, N), weight=_randn(gen, N, N, scale=0.5 * N ** -0.5),
                    alpha=_randn(gen, N, N, scale=0.4 * N ** -0.5), eta=torch.tensor(eta, dtype=F64),
                    y0=_randn(gen, B, N), hebb=_randn(gen, B, N, N, scale=0.1))
        if modulation == "sequence":
            args["modulation"] = _randn(gen, T, B, scale=0.5)
        elif modulation == "neuron":
            args["modulation"] = _randn(gen, T, B, N, scale=0.5)
        elif modulation == "endogenous":  # backpropamine's modulator neuron
            args.update(mod_weight=_randn(gen, N, scale=N ** -0.5), mod_bias=_randn(gen, scale=0.3),
                        mod_fanout=_randn(gen, N, scale=0.5))
        return args

    return inputs


def _batch_norm_rows(rows, channels):
    def inputs(gen):
        return dict(input=_randn(gen, rows, channels, scale=2.0) + 1.0, weight=_randn(gen, channels),
                    bias=_randn(gen, channels))

    return inputs


def batch_norm_rows_reference(input, weight, bias, eps=1e-5):
    """ATen's batch norm with batch statistics: its autograd is the oracle of the fused double backward."""
    return F.batch_norm(input, None, None, weight, bias, training=True, eps=eps)


def _every(steps, eta, activation):
    """Steps between the traces the plastic backward keeps (the case names say what they cross)."""
    return checkpoint_every(steps, eta, None, False, activation)


_CONV_KERNELS = ("masked_conv2d", "masked_conv2d_backward")
_LINEAR_KERNELS = ("masked_linear", "masked_linear_backward")
_PLASTIC_KERNELS = ("plastic", "plastic_backward")
_GPU = frozenset({"cuda"})

CASES = (
    Case("masked_conv2d", "2 tasks, groups 2, bias, pruned, 2nd order", _CONV_KERNELS,
         _conv(2, 2, 4, 4, (4, 4), (3, 3), groups=2), masked_conv2d_reference,
         dict(padding=1, groups=2), second_order=True, quick=True),
    Case("masked_conv2d", "1 task, no bias, stride 2x1, dilation 2", _CONV_KERNELS,
         _conv(None, 2, 3, 5, (7, 6), (3, 2), bias=False), masked_conv2d_reference,
         dict(stride=(2, 1), padding=(1, 0), dilation=2)),
    Case("masked_conv2d", "1x1, bias, skip_zero=False", _CONV_KERNELS,
         _conv(None, 3, 4, 3, (3, 3), (1, 1)), masked_conv2d_reference, dict(skip_zero=False)),
    Case("masked_conv2d", "3 tasks, 64 ch, 10x10, 1/4 pruned", _CONV_KERNELS,
         _conv(3, 4, 64, 64, (10, 10), (3, 3), every=4), masked_conv2d_reference, dict(padding=1), devices=_GPU),
    Case("masked_linear", "1 task, bias, pruned, 2nd order", _LINEAR_KERNELS,
         _linear(None, (5,), 6, 4), masked_linear_reference, second_order=True, quick=True),
    Case("masked_linear", "3 tasks, rows 2x3, no bias", _LINEAR_KERNELS,
         _linear(3, (2, 3), 6, 5, bias=False), masked_linear_reference),
    Case("masked_linear", "2 tasks, 150 rows, 96 -> 80, 1/2 pruned", _LINEAR_KERNELS,
         _linear(2, (150,), 96, 80, every=2), masked_linear_reference, devices=_GPU),
    Case("neuron_sensitivity", "conv weight, bias", ("neuron_sensitivity",),
         _sensitivity((4, 3, 3, 3)), neuron_sensitivity_reference, quick=True),
    Case("neuron_sensitivity", "channels-last conv weight, no bias", ("neuron_sensitivity",),
         _sensitivity((5, 4, 3, 3), bias=False, channels_last=True), neuron_sensitivity_reference),
    Case("neuron_sensitivity", "512 x 1152, bias", ("neuron_sensitivity",),
         _sensitivity((512, 1152)), neuron_sensitivity_reference, devices=_GPU),
    Case("plastic_linear", "hebb, tanh, bias, drive, T=5", _PLASTIC_KERNELS,
         _plastic_linear(5, 2, 3, 4), plastic_linear_reference, dict(rule="hebb", activation="tanh"),
         outputs=("out", "hebb"), quick=True),
    # identity activation: the backward recomputes segments of isqrt(T) steps.
    Case("plastic_linear", f"oja, identity, scalar alpha, T=10, segments {_every(10, 0.1, 'identity')}",
         _PLASTIC_KERNELS, _plastic_linear(10, 2, 4, 3, alpha_scalar=True), plastic_linear_reference,
         dict(rule="oja", activation="identity"), outputs=("out", "hebb")),
    # tanh hebb keeps a trace every ln(256) / -ln(1 - eta) steps (8 at eta 0.5) and reconstructs
    # the others backwards: T=12 crosses a kept trace.
    Case("plastic_rnn", f"hebb, tanh, eta 0.5, T=12, trace kept every {_every(12, 0.5, 'tanh')}",
         _PLASTIC_KERNELS, _plastic_rnn(12, 2, 5, eta=0.5), plastic_rnn_reference,
         dict(rule="hebb", activation="tanh"), outputs=("out", "hebb"), quick=True),
    Case("plastic_rnn", "oja, tanh, clip 0.05, T=9", _PLASTIC_KERNELS,
         _plastic_rnn(9, 2, 5), plastic_rnn_reference, dict(rule="oja", activation="tanh", clip=0.05),
         outputs=("out", "hebb"), quick=True),
    Case("plastic_rnn", "modulated per neuron, tanh, T=6", _PLASTIC_KERNELS,
         _plastic_rnn(6, 3, 4, modulation="neuron"), plastic_rnn_reference, dict(activation="tanh"),
         outputs=("out", "hebb"), quick=True),
    Case("plastic_rnn", "modulated per sequence, identity, T=10", _PLASTIC_KERNELS,
         _plastic_rnn(10, 2, 4, modulation="sequence"), plastic_rnn_reference, dict(activation="identity"),
         outputs=("out", "hebb")),
    Case("plastic_rnn", "endogenous modulation, clip 0.5, T=8", _PLASTIC_KERNELS,
         _plastic_rnn(8, 3, 6, modulation="endogenous"), plastic_rnn_reference, dict(clip=0.5),
         outputs=("out", "hebb"), quick=True),
    # N > 128: the Triton forward streams the trace instead of keeping it in registers.
    Case("plastic_rnn", "hebb, tanh, N=160, T=12", _PLASTIC_KERNELS,
         _plastic_rnn(12, 2, 160), plastic_rnn_reference, dict(rule="hebb", activation="tanh"),
         outputs=("out", "hebb"), devices=_GPU),
    # A float64 trace past shared memory: the CUDA kernels split each sequence over the blocks of a
    # cooperative launch that meet at grid barriers.
    Case("plastic_rnn", "oja, clip 0.5, N=300, B=2, T=9", _PLASTIC_KERNELS,
         _plastic_rnn(9, 2, 300), plastic_rnn_reference, dict(rule="oja", clip=0.5),
         outputs=("out", "hebb"), devices=_GPU),
    Case("batch_norm_rows", "12 rows x 5 channels, 2nd order", ("batch_norm_rows_double_backward",),
         _batch_norm_rows(12, 5), batch_norm_rows_reference, second_order=True, quick=True),
)


# ---- one check -------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    function: str
    case: str
    backend: str
    device: str
    dtype: str
    result: str  # "ok", "skip" (`known_limit`), "MISMATCH", "ERROR", "NO CASE", "UNAVAILABLE"
    output_error: float = float("nan")  # max |got - ref| over the outputs
    gradient_error: float = float("nan")  # ... over the gradients (first and second order)
    rtol: float = float("nan")
    atol: float = float("nan")
    scaled_error: float = float("nan")  # worst max|got - ref| / (atol + rtol * max|ref|); ok at <= 1
    worst: str = ""  # the tensor with the worst scaled error
    note: str = ""  # why it is not ok: the exception, "NaN", a wrong shape, the skip's reason
    seconds: float = 0.0

    @property
    def ok(self):
        """Passed, or could not be checked here for a documented reason."""
        return self.result in ("ok", "skip")


def _leaves(tensors, dtype, device):
    """Round to ``dtype`` (the values both sides see), then make leaves of ``dtype`` on ``device``."""
    out = {}
    for name, t in tensors.items():
        out[name] = None if t is None else t.to(dtype).to(device).detach().requires_grad_()
    return out


def _as_tuple(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def evaluate(fn, inputs, options, cotangents, directions, second_order, output_names):
    """Outputs, gradients of sum(output * cotangent) and, with ``second_order``, the gradients of
    sum(gradient * direction): {tensor name: tensor or None}."""
    outputs = _as_tuple(fn(**inputs, **options))
    names = [name for name, t in inputs.items() if t is not None]
    leaves = [inputs[name] for name in names]
    result = dict(zip(output_names, outputs))
    differentiated = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not differentiated:
        return result
    grads = torch.autograd.grad([o for o, _ in differentiated],
                                leaves, [c.to(device=o.device, dtype=o.dtype) for o, c in differentiated],
                                create_graph=second_order, allow_unused=True)
    result.update({f"d {name}": g for name, g in zip(names, grads)})
    if second_order:
        terms = [(g * directions[name].to(g)).sum() for name, g in zip(names, grads)
                 if g is not None and g.requires_grad]
        if terms:
            grads2 = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
            result.update({f"d2 {name}": g for name, g in zip(names, grads2)})
    return result


def _zeros_for(name, inputs):
    """An unused input's gradient (None) is zero: shape of that input."""
    return torch.zeros(inputs[name.split(" ", 1)[1]].shape, dtype=F64)


def _compare(got, want, inputs, tolerance):
    """{tensor name: (max abs error, scaled error, note)} over the outputs and gradients of both sides."""
    errors = {}
    for name in want.keys() | got.keys():
        w, g = want.get(name), got.get(name)
        if w is None and g is None:
            continue
        w = _zeros_for(name, inputs) if w is None else w.detach().to("cpu", F64)
        g = _zeros_for(name, inputs) if g is None else g.detach().to("cpu", F64)
        if g.shape != w.shape:
            errors[name] = (math.inf, math.inf, f"shape {list(g.shape)}, expected {list(w.shape)}")
            continue
        if g.numel() == 0:
            continue
        diff = (g - w).abs()
        max_error = diff.max().item()
        if math.isnan(max_error):
            errors[name] = (math.inf, math.inf, "NaN")  # an unwritten (poisoned) or NaN element
            continue
        errors[name] = (max_error, tolerance.scaled_error(max_error, w.abs().max().item()), "")
    return errors


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def check_case(case, backend, device, dtype, seed=0):
    """Run ``case`` on ``backend`` / ``device`` in ``dtype`` against the float64 reference: a `Row`."""
    tolerance = TOLERANCES[dtype]
    row = Row(case.function, case.name, backend, device, DTYPE_NAMES[dtype], "ERROR", rtol=tolerance.rtol,
              atol=tolerance.atol)
    start = time.perf_counter()
    try:
        gen = torch.Generator().manual_seed(seed)
        tensors = case.inputs(gen)
        reference_inputs = {k: None if v is None else v.to(dtype).to(F64).requires_grad_() for k, v in tensors.items()}
        # Reference outputs first: their shapes size the cotangents. Both sides see the same
        # cotangents and directions, rounded to the dtype.
        with torch.no_grad():
            shapes = [o.shape for o in _as_tuple(case.reference(**reference_inputs, **case.options))]
        cotangents = [_randn(gen, *s).to(dtype).to(F64) for s in shapes]
        directions = {k: _randn(gen, *v.shape).to(dtype).to(F64) for k, v in tensors.items() if v is not None}
        want = evaluate(case.reference, reference_inputs, case.options, cotangents, directions, case.second_order,
                        case.outputs)
        inputs = _leaves(tensors, dtype, device)
        with nf.use_backend(backend), _alloc.poisoned(), _precision.full_float32():
            got = evaluate(case.call, inputs, case.options, cotangents, directions, case.second_order, case.outputs)
            _synchronize(device)
        errors = _compare(got, want, tensors, tolerance)
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a row of the report, not a crash
        row.note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        row.seconds = time.perf_counter() - start
        return row
    row.seconds = time.perf_counter() - start
    _fill(row, errors)
    return row


def _is_gradient(name):
    return name.startswith(("d ", "d2 "))


def _fill(row, errors):
    gradients = [e for name, e in errors.items() if _is_gradient(name)]
    outputs = [e for name, e in errors.items() if not _is_gradient(name)]
    row.output_error = max((e[0] for e in outputs), default=0.0)
    row.gradient_error = max((e[0] for e in gradients), default=float("nan"))
    worst = max(errors, key=lambda name: errors[name][1], default=None)
    row.scaled_error = errors[worst][1] if worst else 0.0
    row.worst = worst or ""
    row.note = errors[worst][2] if worst else ""
    row.result = "ok" if row.scaled_error <= 1.0 else "MISMATCH"


# ---- the plan ------------------------------------------------------------------------------


def known_limit(backend, device, dtype):
    """Why (backend, device, dtype) cannot be checked here, or None.

    Triton on CPU tensors is its interpreter, which keeps bfloat16 as raw uint16 bits: its tl.dot
    multiplies the bit patterns (triton-lang/triton#11584; the Triton docs list bfloat16 as
    unsupported there). A GPU checks the bfloat16 kernels.
    """
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        return "the Triton interpreter does not compute bfloat16 (triton-lang/triton#11584)"
    return None


def present_devices():
    """Device types with hardware here (the reference backend lists cuda even without a GPU)."""
    return {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())


def _missing_device(device):
    """Why no backend can run on ``device`` tensors here (a device type `present_devices` lacks)."""
    note = f"no {device} device here (torch.cuda.is_available() is False"
    if torch.version.cuda is None:
        note += f"; torch {torch.__version__} is a CPU-only build"
    emulated = [name for name in ("triton", "cuda") if "cpu" in backends.status(name).devices]
    if emulated:
        note += f"; {', '.join(emulated)} run their GPU kernels on cpu tensors here: --device cpu"
    return note + ")"


def case_dtypes(case, backend):
    """Dtypes ``backend`` registers for every kernel the case runs (empty: not its op)."""
    registered = backends.ops()
    dtypes = None
    for op in case.kernels:
        entry = registered.get(op)
        if entry is None or backend not in entry.dtypes:
            return []
        dtypes = entry.dtypes[backend] if dtypes is None else dtypes & entry.dtypes[backend]
    return [d for d in DTYPE_NAMES if d in (dtypes or ())]


def uncovered_ops(cases=CASES):
    """Registered ops that no case runs."""
    covered = {op for case in cases for op in case.kernels}
    return sorted(set(backends.ops()) - covered)


def _runs_any(case, names):
    """The case is of one of ``names``: public functions or registered ops."""
    return case.function in names or bool(set(case.kernels) & set(names))


def plan(backend_names=None, devices=None, dtypes=None, quick=False, functions=None, cases=CASES):
    """[(case, backend, device, dtype)] to run, and [Row] for backends asked for that cannot run.

    ``None`` selects everything usable here; ``functions`` holds public or registered op names.
    """
    unusable = []
    if backend_names is None:
        backend_names = backends.available()
    else:
        for name in backend_names:
            state = backends.status(name)
            if not set(state.devices) & present_devices():
                unusable.append(Row("-", "-", name, "-", "-", "UNAVAILABLE",
                                    note=state.state + (f" ({state.detail})" if state.detail else "")))
    for device in sorted(set(devices or ()) - present_devices()):
        unusable.append(Row("-", "-", "-", device, "-", "UNAVAILABLE", note=_missing_device(device)))
    selected = [c for c in cases if (c.quick or not quick) and (functions is None or _runs_any(c, functions))]
    runs = []
    for case in selected:
        for backend in backend_names:
            usable = sorted(set(backends.status(backend).devices) & present_devices() & case.devices)
            for device in usable:
                if devices is not None and device not in devices:
                    continue
                for dtype in case_dtypes(case, backend):
                    if dtypes is None or dtype in dtypes:
                        runs.append((case, backend, device, dtype))
    return runs, unusable


def run(backend_names=None, devices=None, dtypes=None, quick=False, functions=None, seed=0, on_row=None,
        cases=CASES):
    """Check every planned (case, backend, device, dtype); returns the rows, calling ``on_row`` on each."""
    runs, rows = plan(backend_names, devices, dtypes, quick, functions, cases)
    if functions is None:
        rows += [Row(op, "-", "-", "-", "-", "NO CASE", note="no case in neuronml_fast.selfcheck.CASES runs it")
                 for op in uncovered_ops(cases)]
    for row in rows:
        if on_row:
            on_row(row)
    for case, backend, device, dtype in runs:
        limit = known_limit(backend, device, dtype)
        if limit:
            row = Row(case.function, case.name, backend, device, DTYPE_NAMES[dtype], "skip", note=limit)
        else:
            row = check_case(case, backend, device, dtype, seed)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


# ---- the report ----------------------------------------------------------------------------

_COLUMNS = (("op", 18), ("case", 46), ("backend", 9), ("device", 6), ("dtype", 5), ("out err", 9),
            ("grad err", 9), ("rtol", 7), ("err/tol", 8), ("result", 11))


def _number(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}e}"


def header():
    tolerances = ", ".join(f"{DTYPE_NAMES[d]} rtol {t.rtol:.0e} atol {t.atol:.0e}" for d, t in TOLERANCES.items())
    return "\n".join([
        "every backend against the float64 reference (CPU) on the same inputs rounded to the dtype;",
        "kernel outputs NaN-poisoned; err/tol = worst over outputs and gradients of",
        "max|got - ref| / (atol + rtol * max|ref|), ok at <= 1",
        f"tolerances: {tolerances}",
        "",
        " ".join(f"{name:<{width}}" for name, width in _COLUMNS).rstrip(),
    ])


def format_row(row):
    cells = (row.function, row.case, row.backend, row.device, row.dtype, _number(row.output_error),
             _number(row.gradient_error), _number(row.rtol, 0), _number(row.scaled_error), row.result)
    line = " ".join(f"{str(c)[:w]:<{w}}" for c, (_, w) in zip(cells, _COLUMNS)).rstrip()
    if row.result != "ok":
        detail = "; ".join(p for p in (f"worst: {row.worst}" if row.worst else "", row.note) if p)
        line += f"  {detail}" if detail else ""
    return line


def summary(rows, seconds):
    counts = {}
    for row in rows:
        counts[row.result] = counts.get(row.result, 0) + 1
    parts = ", ".join(f"{n} {result}" for result, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok"))
    checked = [r for r in rows if r.result != "skip"]
    verdict = "all ok" if checked and all(r.ok for r in rows) else "FAILED" if checked else "nothing checked"
    return f"{len(rows)} rows: {parts or 'none'} in {seconds:.1f} s: {verdict}"


# ---- command line --------------------------------------------------------------------------


def _dtype(text):
    try:
        return _DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of fp16, bf16, fp32, fp64, got {text!r}") from None


def parser(prog="python -m neuronml_fast check"):
    p = argparse.ArgumentParser(prog=prog, description="Check every usable backend against the float64 reference "
                                "(forward and gradients, every registered op and dtype); exit 1 on any failure.")
    p.add_argument("--backend", action="append", choices=backends.BACKENDS,
                   help="check only this backend (repeatable; default: every usable one)")
    p.add_argument("--device", action="append", choices=("cpu", "cuda"), help="only this device type (repeatable)")
    p.add_argument("--dtype", action="append", type=_dtype, help="only this dtype: fp16, bf16, fp32, fp64 (repeatable)")
    p.add_argument("--op", action="append", choices=sorted({c.function for c in CASES} | set(backends.ops())),
                   metavar="OP", help="only the cases of this public op or registered kernel op (repeatable)")
    p.add_argument("--quick", action="store_true", help="only the cases marked quick (each feature once), no tile-sized GPU cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    problem = args.json and _outputs.file_problem("--json", args.json)
    if problem:
        p.error(problem)  # before the work, not after it
    start = time.perf_counter()
    print(header(), flush=True)
    rows = run(args.backend, set(args.device) if args.device else None, set(args.dtype) if args.dtype else None,
               args.quick, set(args.op) if args.op else None, args.seed,
               on_row=lambda row: print(format_row(row), flush=True))
    seconds = time.perf_counter() - start
    print(summary(rows, seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": seconds, "ok": passed(rows), "rows": [_json_row(r) for r in rows]}, f, indent=1)
    return 0 if passed(rows) else 1


def _json_row(row):
    """The row as strict JSON: NaN and infinity (no value, a NaN output) become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in dataclasses.asdict(row).items()}


def passed(rows):
    """Something was checked and nothing failed."""
    return any(r.result == "ok" for r in rows) and all(r.ok for r in rows)


if __name__ == "__main__":
    sys.exit(main())
