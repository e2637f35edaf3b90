"""Memory: keep freed memory in the process (glibc), and count what autograd keeps for the backward.

`keep_freed_memory`: keep freed memory in the process so that big activations do not page-fault
every step.

glibc hands blocks above its mmap threshold back to the kernel on free; the next allocation of
the same size then faults in every page again: keeping freed memory makes Conv4's first layer
(32 tasks x 75 images) forward+backward about 3x faster. The meta-learning CLI
and the benchmarks call `keep_freed_memory()` once at start-up, so every backend they compare
runs with the same allocator; the library itself never changes allocator settings on import.
Set NEURONML_FAST_KEEP_MEMORY=0 to leave glibc's defaults alone.

`saved_bytes`: the bytes autograd keeps between a forward and its backward, counted exactly with
saved-tensor hooks. The fused plastic ops promise O(B * N^2) whatever the sequence length: the
tests hold them to it and the benchmark reports it.
"""

import ctypes
import os
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds to 2 GiB. Returns True if applied (Linux glibc only)."""
    if os.environ.get("NEURONML_FAST_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: nothing to tune
        return False
    limit = 2**31 - 1
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))


def saved_bytes(fn, *args):
    """Bytes of the tensors autograd saves for the backward while ``fn(*args)`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total
