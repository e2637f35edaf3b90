"""The backend registry: the one place that decides which implementation runs an op.

Backends (SPEC section 1):

* ``reference`` - plain eager PyTorch, the oracle; runs anything PyTorch runs.
* ``cpu``       - the compiled C++ extension ``neuronml_fast._C_cpu`` (CPU tensors).
* ``triton``    - the Triton kernels in ``neuronml_fast.kernels`` (CUDA tensors; CPU tensors only
                  under ``TRITON_INTERPRET=1``, which must be set before triton is imported).
* ``cuda``      - the compiled CUDA C++ extension ``neuronml_fast._C_cuda`` (CUDA tensors; CPU
                  tensors only under ``NEURONML_FAST_CUDA_EMULATE=1``, which runs the same kernels
                  in the CPU emulation built as ``neuronml_fast._C_cuda_emulated``).

``auto`` (the default) picks, per call, the first backend in ``auto_order(op, device, dtype)``
that is usable here and has a kernel for the op and dtype: ``AUTO_ORDER`` per device type, and
on CUDA tensors an order per op family and dtype derived from what the kernels run on
(`gpu_order`: tensor cores first, then the cheaper launch), which ``python -m neuronml_fast``
prints with its reason. Its last resort is ``reference``: that is the only fallback, and the
report prints where it happens. A backend named explicitly (`set_backend`, `use_backend`,
``NEURONML_FAST_BACKEND``) never falls back: it runs or raises.

Every op registers itself once with `register_op`, naming its family; `KERNELS` here lists each
family's kernel backends and their dtypes. A backend's launchers for a family are one module in
the family's folder (``neuronml_fast/ops/<family>/<backend>.py``, beside the reference and the
custom op), imported on first use: the Triton one imports triton. The op calls
``launchers(op, backend).<function>(...)``, so the choice of backend is made here only, and a
``grep`` for a launcher's name finds its call and every backend's definition. One calling
convention for all of them: a launcher takes the op's inputs, allocates its outputs (see
`_alloc`) and returns them. A family's launcher functions, and the layout object a backend may
add where it keeps the op's tensors in a layout of its own (the CPU masked conv2d: grouped
NHWC), are listed in the family's ``op.py``.
"""

import contextlib
import dataclasses
import importlib
import importlib.util
import os

import torch

from . import _extensions
from ._checks import FLOAT_DTYPES

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO = "auto"
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Devices without a kernel backend (meta, mps, ...) run the reference: it is plain PyTorch.
_OTHER_DEVICE_ORDER = ("reference",)

FULL_DTYPES = frozenset({torch.float32, torch.float64})


@dataclasses.dataclass(frozen=True)
class Status:
    """Whether a backend can run here, and on which device types."""

    name: str
    state: str  # "available", "built (no device)" or "not built: <reason>"
    devices: frozenset = frozenset()
    detail: str = ""

    @property
    def usable(self):
        return bool(self.devices)


@dataclasses.dataclass(frozen=True)
class OpEntry:
    name: str
    family: str  # its folder neuronml_fast/ops/<family>/ and its row of KERNELS
    dtypes: dict  # backend -> frozenset of supported dtypes ("reference" included)
    modules: dict  # kernel backend -> the absolute name of its launcher module


_ops = {}
_launcher_cache = {}
_status = {}


def _triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_status():
    """Cheap: imports the compiled extensions, but not triton (only looks it up)."""
    cuda_device = torch.cuda.is_available()
    status = {"reference": Status("reference", "available", frozenset({"cpu", "cuda"}), "plain eager PyTorch")}

    if _extensions.cpu() is not None:
        status["cpu"] = Status("cpu", "available", frozenset({"cpu"}), "C++ extension neuronml_fast._C_cpu")
    else:
        status["cpu"] = Status("cpu", f"not built: {_extensions.error('_C_cpu')}")

    if importlib.util.find_spec("triton") is None:
        status["triton"] = Status("triton", "not built: triton is not installed (pip install triton)")
    else:
        devices = ({"cuda"} if cuda_device else set()) | ({"cpu"} if _triton_interpret() else set())
        detail = "interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing" if _triton_interpret() else ""
        if devices:
            status["triton"] = Status("triton", "available", frozenset(devices), detail)
        else:
            status["triton"] = Status("triton", "built (no device)", frozenset(),
                                      "no CUDA device; set TRITON_INTERPRET=1 to run the kernels on CPU tensors")

    if _extensions.cuda_emulated():
        emulated = _extensions.cuda()
        if emulated is None:
            status["cuda"] = Status("cuda", f"not built: {_extensions.error('_C_cuda_emulated')}")
        else:
            order = emulated.emulation_state()["order"]
            status["cuda"] = Status("cuda", "available", frozenset({"cpu"}),
                                    f"emulated ({_extensions.EMULATE_ENV}=1): the CUDA C++ kernels on CPU tensors, "
                                    f"{order} warp order, slow, for testing")
    elif torch.version.cuda is None:
        status["cuda"] = Status("cuda", "not built: torch is a CPU-only build")
    elif _extensions.cuda() is None:
        status["cuda"] = Status("cuda", f"not built: {_extensions.error('_C_cuda')}")
    elif cuda_device:
        status["cuda"] = Status("cuda", "available", frozenset({"cuda"}), "CUDA C++ extension neuronml_fast._C_cuda")
    else:
        status["cuda"] = Status("cuda", "built (no device)", frozenset(), "no CUDA device visible")
    return status


def refresh():
    """Re-probe the machine (after setting TRITON_INTERPRET, say)."""
    _status.clear()
    _status.update(_probe_status())
    _launcher_cache.clear()


def status(name=None):
    """`Status` of one backend, or a dict of all of them."""
    if not _status:
        refresh()
    if name is None:
        return dict(_status)
    return _status[_check_backend_name(name, allow_auto=False)]


def missing_compiled_backends():
    """{backend: reason} for the compiled backends that ``auto`` would run on this machine's devices
    but that did not load (not built, or built against another torch)."""
    wanted = {"cpu": True, "cuda": torch.cuda.is_available() and not _extensions.cuda_emulated()}
    return {name: status(name).state for name, want in wanted.items()
            if want and status(name).state.startswith("not built")}


def available():
    """Backends that can run on this machine now (SPEC section 1)."""
    return [name for name in BACKENDS if status(name).usable]


# ---------------------------------------------------------------------------------------------
# The requested backend: "auto", set_backend, use_backend, NEURONML_FAST_BACKEND.


def _check_backend_name(name, allow_auto=True):
    choices = ((AUTO,) if allow_auto else ()) + BACKENDS
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, choices))}, got {name!r}")
    return name


ENV_VAR = "NEURONML_FAST_BACKEND"
# The requested backend. Read from the environment once, unchecked: a bad value must not break
# ``import neuronml_fast``, nor ``python -m neuronml_fast``, the report that diagnoses it. An op
# that resolves its backend raises `environment_problem` instead.
_requested = os.environ.get(ENV_VAR, "").strip() or AUTO


def environment_problem():
    """Why the requested backend, ``NEURONML_FAST_BACKEND``'s value, names no backend; None when it does."""
    if _requested in (AUTO,) + BACKENDS:
        return None
    choices = ", ".join(map(repr, (AUTO,) + BACKENDS))
    return (f"{ENV_VAR}: expected one of {choices}, got {_requested!r} (fix or unset the environment variable, "
            f"or call neuronml_fast.set_backend)")


def get_backend():
    """The requested backend: "auto", a name of `BACKENDS`, or NEURONML_FAST_BACKEND's value as
    given (then `environment_problem` says why it names none)."""
    return _requested


def set_backend(name):
    """Select the backend for every op: "auto" (default) or one of `BACKENDS`."""
    global _requested
    _requested = _check_backend_name(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the ops inside the block on backend ``name``."""
    global _requested
    previous = _requested
    set_backend(name)
    try:
        yield
    finally:
        _requested = previous


# ---------------------------------------------------------------------------------------------
# Ops and kernels.


# The kernel backends of each op family and the dtypes their kernels take. Backend b's launchers
# for family f are the module ``neuronml_fast.ops.<f>.<b>``, beside the family's reference and
# custom ops.
KERNELS = {
    "masked": {"cpu": FULL_DTYPES, "triton": FLOAT_DTYPES, "cuda": FLOAT_DTYPES},
    "plastic": {"cpu": FULL_DTYPES, "triton": FLOAT_DTYPES, "cuda": FLOAT_DTYPES},
    "sensitivity": {"cpu": FULL_DTYPES, "triton": FLOAT_DTYPES, "cuda": FLOAT_DTYPES},
    "batch_norm": {"cpu": FULL_DTYPES, "triton": FULL_DTYPES},
}


def register_op(name, *, family, reference=FLOAT_DTYPES):
    """Declare an op of ``family`` (the folder ``neuronml_fast/ops/<family>/``) and the dtypes its
    reference takes; its kernel backends and their dtypes are the family's in `KERNELS`."""
    if family not in KERNELS:
        raise ValueError(f"register_op({name!r}): expected an op family in {sorted(KERNELS)}, got {family!r}")
    kernels = KERNELS[family]
    dtypes = {"reference": frozenset(reference), **kernels}
    _ops[name] = OpEntry(name, family, dtypes,
                         {backend: f"neuronml_fast.ops.{family}.{backend}" for backend in kernels})


def ops():
    return dict(_ops)


# ---------------------------------------------------------------------------------------------
# auto's order on CUDA tensors, per op family and dtype.

_HALF = frozenset({torch.float16, torch.bfloat16})
# The kernel backends whose GEMMs run on the tensor cores, per op family and dtype: the masked
# layers' on both GPU backends in float16/bfloat16 (HMMA / mma, wgmma) and float32 (TF32, where
# torch's switch allows it; with it off both multiply in exact float32 on FMA), and in float64 on
# the CUDA C++ backend only (DMMA; Triton has no fp64 dot). The other families have no GEMM on
# the GPU (plastic: per-step matrix-vector products and outer-product traces; sensitivity and
# batch norm: reductions).
TENSOR_CORES = {"masked": {"cuda": _HALF | FULL_DTYPES, "triton": _HALF | {torch.float32}}}
# Between backends that are otherwise alike, the cheaper launch first: a CUDA C++ kernel is one
# call into a C++ launcher, a Triton launch binds and specializes its arguments in Python first,
# which the small problems of meta-learning (a few images per task, a launch per layer and step)
# feel. (On large problems Triton's pipelined tiles may well be faster; `set_backend` or
# NEURONML_FAST_BACKEND choose it.)
LAUNCH_COST_ORDER = ("cuda", "triton")


def gpu_order(family, dtype):
    """(order, reason): the kernel backends ``auto`` tries on CUDA tensors for an op family in
    ``dtype``, best first, and why. Tensor-core backends come first, then the cheaper launch."""
    kernels = KERNELS[family]
    candidates = [b for b in LAUNCH_COST_ORDER if dtype in kernels.get(b, ())]
    on_tensor_cores = {b for b in candidates if dtype in TENSOR_CORES.get(family, {}).get(b, ())}
    order = tuple(sorted(candidates, key=lambda b: (b not in on_tensor_cores, LAUNCH_COST_ORDER.index(b))))
    if not order:
        return order, "no GPU kernel in this dtype"
    if len(order) == 1:
        kind = "tensor cores" if on_tensor_cores else "CUDA cores"
        return order, f"only {order[0]} has a GPU kernel ({kind})"
    if len(on_tensor_cores) == 1:
        first = order[0]
        return order, f"{first} runs the GEMMs on tensor cores, {', '.join(order[1:])} on FMA"
    what = ("both on tensor cores" + (" (TF32 where torch's switch allows, else both exact FMA)"
                                      if dtype == torch.float32 else "")) if on_tensor_cores else "neither has a tensor-core GEMM"
    return order, f"{what}; {order[0]} first: the cheaper launch (from C++, not Python)"


def auto_order(op, device_type, dtype):
    """The backends ``auto`` tries for ``op`` on tensors of this device type and dtype, in order."""
    if device_type == "cuda":
        return gpu_order(_ops[op].family, dtype)[0] + ("reference",)
    return AUTO_ORDER.get(device_type, _OTHER_DEVICE_ORDER)


def _built_for_gpu(backend):
    """Whether a GPU backend would run on a CUDA device, whatever it runs on here (the
    interpreter and the emulation run on CPU tensors)."""
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    return torch.version.cuda is not None and _extensions.load("_C_cuda") is not None


def _can_run(entry, backend, device_type, dtype, assume_device=False):
    if backend not in entry.dtypes or dtype not in entry.dtypes[backend]:
        return False
    if assume_device and device_type == "cuda" and backend in ("triton", "cuda"):
        return _built_for_gpu(backend)
    return device_type in status(backend).devices


def resolve(op, device_type, dtype, requested=None):
    """Name of the backend that runs ``op`` on tensors of this device type and dtype."""
    entry = _ops[op]
    if requested is None:
        requested = _requested
        if environment_problem():
            raise ValueError(environment_problem())
    if requested == AUTO:
        for backend in auto_order(op, device_type, dtype):
            if _can_run(entry, backend, device_type, dtype):
                return backend
        return "reference"
    backend_status = status(requested)
    if device_type not in backend_status.devices:
        raise RuntimeError(
            f"backend {requested!r} cannot run {op} on {device_type} tensors here: {backend_status.state}"
            + (f" ({backend_status.detail})" if backend_status.detail else "")
        )
    if requested not in entry.dtypes:
        raise NotImplementedError(f"backend {requested!r} has no kernel for {op}; use 'auto' or 'reference'")
    if dtype not in entry.dtypes[requested]:
        supported = ", ".join(sorted(str(d).replace("torch.", "") for d in entry.dtypes[requested]))
        raise TypeError(f"{op}: backend {requested!r} expected dtype in ({supported}), got {dtype}")
    return requested


def supports(op, backend, dtype):
    """Whether ``backend`` runs ``op`` in ``dtype`` (a kernel for it, or the reference)."""
    return dtype in _ops[op].dtypes.get(backend, ())


def launchers(op, backend):
    """The launcher module of ``op`` on a kernel backend."""
    key = (op, backend)
    if key not in _launcher_cache:
        module = _ops[op].modules.get(backend)
        if module is None:
            raise NotImplementedError(f"backend {backend!r} has no kernel for {op}")
        _launcher_cache[key] = importlib.import_module(module)
    return _launcher_cache[key]


def plan(assume_device=False):
    """What ``auto`` runs per op, device type and dtype: {(op, device, dtype): backend}.

    With ``assume_device``, backends that are built but have no device here count as usable:
    the plan this installation would follow on a machine with a GPU.
    """
    result = {}
    for op, entry in _ops.items():
        for device in AUTO_ORDER:
            for dtype in FLOAT_DTYPES:
                chosen = next((b for b in auto_order(op, device, dtype) if _can_run(entry, b, device, dtype,
                                                                                   assume_device)), "reference")
                result[(op, device, dtype)] = chosen
    return result
