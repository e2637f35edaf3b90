"""Triton kernel for the per-neuron Taylor sensitivity (SPEC section 3).

kernel (`_neuron_sensitivity_kernel`) -> launcher (`neuron_sensitivity_out`). The autograd
rule, the custom-op registration and the eager reference live in
``neuronml_fast/ops/sensitivity.py``.
"""

import triton
import triton.language as tl

from ._common import accumulation_tl_dtype, launch


@triton.jit
def _neuron_sensitivity_kernel(
    weight_ptr, grad_ptr, bias_ptr, grad_bias_ptr, sensitivity_ptr, taylor_ptr,
    rows, cols, weight_row_stride, grad_row_stride, bias_stride, grad_bias_stride,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    # A tile of BLOCK_ROWS neurons walks along its rows; each row is read once, at full width.
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    row64 = row.to(tl.int64)  # row * stride overflows int32 for large layers
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=ACC_DTYPE)
    for start in range(0, cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        ok = row_ok[:, None] & (col < cols)[None, :]
        w = tl.load(weight_ptr + row64[:, None] * weight_row_stride + col[None, :], mask=ok, other=0.0)
        g = tl.load(grad_ptr + row64[:, None] * grad_row_stride + col[None, :], mask=ok, other=0.0)
        acc += w.to(ACC_DTYPE) * g.to(ACC_DTYPE)
    taylor = tl.sum(acc, axis=1)
    if HAS_BIAS:
        b = tl.load(bias_ptr + row64 * bias_stride, mask=row_ok, other=0.0).to(ACC_DTYPE)
        gb = tl.load(grad_bias_ptr + row64 * grad_bias_stride, mask=row_ok, other=0.0).to(ACC_DTYPE)
        taylor += b * gb
    tl.store(taylor_ptr + row, taylor, mask=row_ok)
    tl.store(sensitivity_ptr + row, tl.abs(taylor), mask=row_ok)


def _tile(rows, cols):
    """Short rows: many neurons per program; long rows: one wide row per program."""
    block_cols = min(max(triton.next_power_of_2(max(cols, 1)), 16), 1024)
    block_rows = max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_cols, 32))
    return block_rows, block_cols


def neuron_sensitivity_out(weight, grad_weight, bias, grad_bias, sensitivity, taylor):
    """weight, grad_weight: [rows, cols], inner dimension contiguous. Writes both outputs."""
    rows, cols = weight.shape
    if rows == 0:
        return
    block_rows, block_cols = _tile(rows, cols)
    has_bias = bias is not None
    launch(
        _neuron_sensitivity_kernel, (triton.cdiv(rows, block_rows),), weight, grad_weight,
        bias if has_bias else weight, grad_bias if has_bias else weight,  # unused when HAS_BIAS is False
        sensitivity, taylor,
        rows, cols, weight.stride(0), grad_weight.stride(0),
        bias.stride(0) if has_bias else 0, grad_bias.stride(0) if has_bias else 0,
        HAS_BIAS=has_bias, ACC_DTYPE=accumulation_tl_dtype(weight.dtype),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
    )


__all__ = ["neuron_sensitivity_out"]
