"""Output allocation for every kernel backend, in one place.

Kernels never allocate their outputs: their launchers do (every launcher takes an op's inputs
and returns its outputs, see neuronml_fast/backends.py), uninitialized buffers through `empty`
here (the CPU masked conv2d forward launcher, in C++, from the same pool, following
`poisoning()`). With poisoning on (`NEURONML_FAST_POISON=1`, or
`poisoned()` in tests) every buffer from `empty` starts as NaN, so an element a kernel forgot to
write shows up as NaN instead of passing by luck.

CPU buffers come from the C++ buffer pool (csrc/cpu/buffer_pool.h) when the extension is
built: a fresh multi-megabyte allocation faults on every page on first touch, the pool hands
back buffers that already have their pages.
`cpu_pool_stats`, `empty_cpu_cache` and `set_cpu_pool_limit` control it (like
torch.cuda.empty_cache for the CUDA caching allocator); NEURONML_FAST_CPU_POOL_MB sets the
limit at start-up (default 1024, 0 turns the pool off).
"""

import contextlib
import math
import os

import torch

from . import _extensions

_poison = os.environ.get("NEURONML_FAST_POISON", "0") == "1"

def _new(shape, dtype, device):
    device = torch.device(device)
    ext = _extensions.cpu() if device.type == "cpu" else None
    # Below the pool's threshold torch.empty is as good: glibc's small-block heap keeps its pages.
    if ext is not None and math.prod(shape) * dtype.itemsize >= ext.pool_min_bytes:
        return ext.pooled_empty(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def empty(shape, *, dtype, device):
    out = _new(tuple(shape), dtype, device)
    return out.fill_(float("nan")) if _poison else out


def zeros(shape, *, dtype, device):
    return _new(tuple(shape), dtype, device).zero_()


def poisoning():
    return _poison


@contextlib.contextmanager
def poisoned(enabled=True):
    """Allocate kernel outputs NaN-filled inside this block."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def accumulation_dtype(dtype):
    """Reductions and state: float64 for float64 inputs, float32 otherwise (SPEC conventions)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the CPU buffer pool -------------------------------------------------------------------


def _pool():
    ext = _extensions.cpu()
    if ext is None:
        raise RuntimeError(f"the CPU buffer pool is part of the C++ CPU extension, which is not built: "
                           f"{_extensions.error('_C_cpu')}")
    return ext


def cpu_pool_stats():
    """``{'hits', 'misses', 'cached_bytes', 'cached_blocks', 'limit_bytes'}`` of the CPU buffer pool."""
    return dict(_pool().pool_stats())


def empty_cpu_cache():
    """Return every cached (unused) CPU buffer to the system. Live tensors are untouched."""
    _pool().pool_empty_cache()


def set_cpu_pool_limit(nbytes):
    """Hold at most ``nbytes`` of unused CPU buffers for reuse (0 turns the pool off)."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes: expected a non-negative int, got {nbytes!r}")
    _pool().pool_set_limit(nbytes)
