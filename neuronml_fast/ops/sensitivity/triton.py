"""The Triton launcher of the per-neuron sensitivity (kernels/sensitivity.py). Importing this module
imports triton."""

import triton

from ...kernels import sensitivity as kernels
from .._triton_launch import accumulation_tl_dtype, launch
from .op import new_outputs


def _tile(rows, cols):
    """Short rows: many neurons per program; long rows: one wide row per program."""
    block_cols = min(max(triton.next_power_of_2(max(cols, 1)), 16), 1024)
    block_rows = max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_cols, 32))
    return block_rows, block_cols


def neuron_sensitivity(weight, grad_weight, bias, grad_bias):
    """weight, grad_weight: [rows, cols], inner dimension contiguous."""
    sensitivity, taylor = new_outputs(weight)
    rows, cols = weight.shape
    if rows == 0:
        return sensitivity, taylor
    block_rows, block_cols = _tile(rows, cols)
    has_bias = bias is not None
    launch(
        kernels._neuron_sensitivity_kernel, (triton.cdiv(rows, block_rows),), weight, grad_weight,
        bias if has_bias else weight, grad_bias if has_bias else weight,  # unused when HAS_BIAS is False
        sensitivity, taylor,
        rows, cols, weight.stride(0), grad_weight.stride(0),
        bias.stride(0) if has_bias else 0, grad_bias.stride(0) if has_bias else 0,
        HAS_BIAS=has_bias, ACC_DTYPE=accumulation_tl_dtype(weight.dtype),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
    )
    return sensitivity, taylor
