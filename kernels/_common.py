"""Helpers shared by the Triton launchers."""

import torch
import triton.language as tl


def accumulation_tl_dtype(dtype):
    """float64 accumulation for float64 inputs, float32 for everything else (SPEC conventions)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
