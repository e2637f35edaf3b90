"""Autocast for the custom ops: each behaves as its torch counterpart does under ``torch.autocast``.

Policies (the counterpart in brackets):

* `LOWER` [``conv2d``, ``linear``, the RNN cells]: floating inputs are cast to the autocast
  dtype and the outputs come back in it. A state input or output (the plastic trace) stays in the
  accumulation dtype (float32; SPEC conventions).
* `FP32` [``sum``, ``norm``: CUDA autocast's float32 list]: inputs cast to float32, outputs float32.
* `AS_GIVEN` [``batch_norm``, and every backward op]: no cast; the op runs in its inputs' dtype.

Where the backend that runs the call has no kernel for the dtype a policy asks for (the C++ CPU
backend takes float32 and float64 only), the op computes in float32 and casts its outputs to the
dtype the policy would have returned: the same result type as torch's, at float32 accuracy, never
an error. float64 tensors are never cast (autocast leaves them alone).

Two places apply a policy, with one rule (`compute_dtype`):

* the public functions (`autocast_inputs`): they pick the backend and cast the caller's tensors
  to the dtype the op will compute in, so that a bfloat16 activation meeting a float32 weight is
  one dtype when the op's arguments are checked;
* the ops' autocast kernels (`register`), for calls of the custom ops themselves
  (``torch.ops.neuronml_fast.*``), registered for the CPU and CUDA autocast keys.
"""

import dataclasses

import torch

from .. import _alloc, backends

LOWER, FP32, AS_GIVEN = "lower", "fp32", "as_given"
DEVICE_TYPES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Policy:
    kind: str
    state_inputs: tuple = ()  # argument positions kept in the accumulation dtype
    cast_outputs: tuple = ()  # output positions returned in the autocast dtype (LOWER)


def target_dtype(device_type):
    """The autocast dtype where autocast is on for ``device_type``, else None."""
    if device_type not in DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _eligible(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _given_dtype(tensors):
    dtypes = [t.dtype for t in tensors if _eligible(t)]
    return None if not dtypes else max(dtypes, key=lambda d: torch.finfo(d).bits)


def compute_dtype(op, backend, kind, target, given):
    """(the dtype the op computes in, the dtype its outputs come back in) under a policy."""
    wanted = {LOWER: target, FP32: torch.float32, AS_GIVEN: given}[kind]
    computed = wanted if backends.supports(op, backend, wanted) else torch.float32
    return computed, wanted


def _cast(t, dtype):
    return t.to(dtype) if _eligible(t) and t.dtype != dtype else t


def _cast_args(args, dtype, state_inputs):
    state = _alloc.accumulation_dtype(dtype)
    return tuple(_cast(a, state if i in state_inputs else dtype) for i, a in enumerate(args))


def _cast_outputs(outputs, policy, computed, wanted):
    if policy.kind == LOWER:
        positions = policy.cast_outputs
    elif policy.kind == AS_GIVEN and computed != wanted:
        positions = range(len(outputs))
    else:
        return outputs
    return tuple(_cast(o, wanted) if i in positions else o for i, o in enumerate(outputs))


def run(op_def, op, policy, target, args):
    """One call of the custom op ``op_def`` (registered as ``op``, its backend the last argument)
    under autocast to ``target``, with autocast itself already excluded."""
    backend = args[-1]
    computed, wanted = compute_dtype(op, backend, policy.kind, target, _given_dtype(args))
    if wanted is None:  # no floating input to cast
        return op_def(*args)
    outputs = op_def(*_cast_args(args, computed, policy.state_inputs))
    return _cast_outputs(outputs, policy, computed, wanted)


_library = torch.library.Library("neuronml_fast", "IMPL")


def register(op_def, op, policy):
    """The autocast kernels of the custom op ``op_def`` (``op``: its name in the registry)."""
    name = op_def._qualname.split("::", 1)[1]
    for device_type in DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, excluded=excluded):
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return run(op_def, op, policy, torch.get_autocast_dtype(device_type), args)

        _library.impl(name, kernel, key, with_keyset=True)


def autocast_inputs(op, kind, device_type, given, tensors, state_inputs=()):
    """For a public function: ``(backend, tensors)``, the backend that runs ``op`` on the caller's
    tensors of dtype ``given``, and those tensors cast to the dtype it computes in under autocast
    (unchanged without autocast). Under ``auto``, a kernel backend computing in float32 is
    preferred to the reference computing in the autocast dtype: the kernels skip pruned neurons."""
    target = target_dtype(device_type)
    if target is None or given == torch.float64:
        return backends.resolve(op, device_type, given), tensors
    backend = backends.get_backend()
    if backend == backends.AUTO:
        wanted = {LOWER: target, FP32: torch.float32, AS_GIVEN: given}[kind]
        backend = backends.resolve(op, device_type, wanted)
        if backend == "reference":
            backend = backends.resolve(op, device_type, torch.float32)
    computed, _ = compute_dtype(op, backend, kind, target, given)
    backends.resolve(op, device_type, computed, requested=backend)  # a backend named explicitly: runs or raises
    return backend, _cast_args(tensors, computed, state_inputs)
