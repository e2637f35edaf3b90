"""Helpers shared by the Triton launchers (`neuronml_fast/ops/*/triton.py`); importing this imports triton."""

import contextlib

import torch
import triton.language as tl

from .. import _alloc

# CUDA launch limits: grid x up to 2^31 - 1 blocks, y and z up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def accumulation_tl_dtype(dtype):
    """The Triton type of `_alloc.accumulation_dtype(dtype)`."""
    return {torch.float64: tl.float64, torch.float32: tl.float32}[_alloc.accumulation_dtype(dtype)]


def on_device(device):
    """The CUDA device of `device` made current (Triton launches on the current device), or nothing
    for a CPU tensor under the interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_grid(grid, what):
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise ValueError(f"{what}: {size} blocks on grid axis {'xyz'[axis]}, over the CUDA limit of {limit}; "
                             f"the problem is too large for one launch")


# What `launch` hands every launch to instead of running it, while `intercepted` says so.
_handler = None


@contextlib.contextmanager
def intercepted(handler):
    """Inside this block `launch` calls ``handler(kernel, grid, args, kwargs)`` instead of running
    the kernel; a handler that runs it too calls `launch` inside ``intercepted(None)``. For the
    tools that count or record launches (bench/launches.py)."""
    global _handler
    previous, _handler = _handler, handler
    try:
        yield
    finally:
        _handler = previous


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on the device of its first tensor argument. Every Triton
    launch goes through here."""
    check_grid(grid, kernel.__name__)
    if _handler is not None:
        _handler(kernel, grid, args, kwargs)
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with on_device(device):
        kernel[grid](*args, **kwargs)
