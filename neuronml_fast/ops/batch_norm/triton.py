"""The Triton launcher of the batch norm's double backward (kernels/batch_norm.py). Importing this
module imports triton."""

import triton

from ... import _alloc
from ...kernels import batch_norm as kernels
from .._triton_launch import launch

# Bytes of one program's [BLOCK_R, BLOCK_C] tile: the first pass keeps 5 accumulators of it in
# registers (40 registers a thread at 4 warps, float32 or float64).
TILE_BYTES = 4096
# Chunks of rows: enough programs to fill a GPU, few enough that re-adding every chunk's partial
# sums in each program of the second pass stays small against the pass itself.
TARGET_PROGRAMS = 1024
MAX_CHUNKS = 64


def _tile(channels, itemsize):
    """(BLOCK_R, BLOCK_C): whole rows of up to 128 channels."""
    block_c = min(max(triton.next_power_of_2(channels), 16), 128)
    return max(1, TILE_BYTES // itemsize // block_c), block_c


def _chunks(rows, column_blocks, block_r):
    """(rows per chunk, chunks): a multiple of block_r rows per chunk."""
    wanted = max(1, min(triton.cdiv(TARGET_PROGRAMS, column_blocks), triton.cdiv(rows, block_r), MAX_CHUNKS))
    rows_per_chunk = triton.cdiv(triton.cdiv(rows, wanted), block_r) * block_r
    return rows_per_chunk, triton.cdiv(rows, rows_per_chunk)


def _vector(t, like):
    """A [C] vector contiguous; None (a zero gradient) as zeros."""
    return _alloc.zeros(like.shape, dtype=like.dtype, device=like.device) if t is None else t.contiguous()


def batch_norm_rows_double_backward(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd):
    """(d grad_out, d input, d weight); see `reference.batch_norm_rows_double_backward_reference`.
    The [R, C] matrices may have any strides; the outputs are contiguous."""
    rows, channels = input.shape
    new = lambda shape: _alloc.empty(shape, dtype=input.dtype, device=input.device)  # noqa: E731
    d_grad_out, d_input = new(input.shape), new(input.shape)
    if rows == 0 or channels == 0:
        # No rows: every sum is empty and d weight = invstd * R * K = 0.
        return d_grad_out, d_input, _alloc.zeros(weight.shape, dtype=input.dtype, device=input.device)
    d_weight = new(weight.shape)
    block_r, block_c = _tile(channels, input.element_size())
    column_blocks = triton.cdiv(channels, block_c)
    rows_per_chunk, chunks = _chunks(rows, column_blocks, block_r)
    partial = _alloc.empty((chunks, 5, channels), dtype=input.dtype, device=input.device)
    has_u = u is not None
    u_matrix = u if has_u else grad_out  # unread when HAS_U is False
    mean, invstd = mean.contiguous(), invstd.contiguous()
    strides = (*u_matrix.stride(), *grad_out.stride(), *input.stride())
    grid = (chunks, column_blocks)
    meta = dict(HAS_U=has_u, BLOCK_R=block_r, BLOCK_C=block_c)
    launch(kernels._bn_rows_sums_kernel, grid, u_matrix, grad_out, input, mean, invstd, partial,
           rows, channels, rows_per_chunk, *strides, **meta)
    launch(kernels._bn_rows_grads_kernel, grid, u_matrix, _vector(u_gamma, weight), _vector(u_beta, weight),
           grad_out, input, weight.contiguous(), mean, invstd, partial, d_grad_out, d_input, d_weight,
           rows, channels, rows_per_chunk, chunks, *strides, **meta)
    return d_grad_out, d_input, d_weight
