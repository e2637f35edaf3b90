"""Triton kernel for the per-neuron Taylor sensitivity (SPEC section 3).

The kernel `_neuron_sensitivity_kernel`; its launcher is ``neuronml_fast/ops/sensitivity/triton.py``,
beside the reference, the custom op and the other backends' launchers.
"""

import triton
import triton.language as tl


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
