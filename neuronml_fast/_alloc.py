"""Output allocation for every kernel backend, in one place.

Kernels never allocate their outputs: the Python launchers call `empty` here and hand the
buffers in. With poisoning on (`NEURONML_FAST_POISON=1`, or `poisoned()` in tests) every buffer
starts as NaN, so an element a kernel forgot to write shows up as NaN instead of passing by luck.
"""

import contextlib
import os

import torch

_poison = os.environ.get("NEURONML_FAST_POISON", "0") == "1"


def empty(shape, *, dtype, device):
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


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
