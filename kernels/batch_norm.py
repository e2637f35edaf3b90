"""Triton kernels of the batch norm's double backward over the rows of a [R, C] matrix.

Same math as the C++ CPU kernel (csrc/cpu/batch_norm_kernels.inc, whose comment derives it): per
channel, five sums over the rows (g, g*x_hat, u, u*x_hat, u*g), then seven per-channel
coefficients, then one fused expression per element for d grad_out and d input, and d weight from
the sums alone. Two launches, deterministic (no atomics; every sum is formed in a fixed order):

* `_bn_rows_sums_kernel`: program (chunk, column block) sums its chunk of rows into one partial
  row per sum, ``partial[chunk, 5, C]`` (g, g*x_hat, u, u*x_hat, u*g; the last three only with u).
* `_bn_rows_grads_kernel`: program (chunk, column block) adds the partials of every chunk in chunk
  order (each program the same sums), forms the coefficients and writes its chunk of both
  gradients; the programs of chunk 0 also write d weight.

The launcher is ``neuronml_fast/ops/batch_norm/triton.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _bn_rows_sums_kernel(
    u_ptr, g_ptr, x_ptr, mean_ptr, invstd_ptr, partial_ptr,
    R, C, rows_per_chunk, u_row_stride, u_col_stride, g_row_stride, g_col_stride, x_row_stride, x_col_stride,
    HAS_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < C
    mean = tl.load(mean_ptr + col, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + col, mask=col_ok, other=0.0)
    dtype = mean.dtype
    s_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=dtype)
    s_gx = tl.zeros([BLOCK_R, BLOCK_C], dtype=dtype)
    s_u = tl.zeros([BLOCK_R, BLOCK_C], dtype=dtype)
    s_ux = tl.zeros([BLOCK_R, BLOCK_C], dtype=dtype)
    s_ug = tl.zeros([BLOCK_R, BLOCK_C], dtype=dtype)
    first = chunk * rows_per_chunk
    end = tl.minimum(first + rows_per_chunk, R)
    for start in range(first, end, BLOCK_R):
        row = (start + tl.arange(0, BLOCK_R)).to(tl.int64)  # row * stride overflows int32 for large matrices
        ok = (row < end)[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + row[:, None] * g_row_stride + col[None, :] * g_col_stride, mask=ok, other=0.0)
        x = tl.load(x_ptr + row[:, None] * x_row_stride + col[None, :] * x_col_stride, mask=ok, other=0.0)
        x_hat = tl.where(ok, (x - mean[None, :]) * invstd[None, :], 0.0)
        s_g += g
        s_gx += g * x_hat
        if HAS_U:
            u = tl.load(u_ptr + row[:, None] * u_row_stride + col[None, :] * u_col_stride, mask=ok, other=0.0)
            s_u += u
            s_ux += u * x_hat
            s_ug += u * g
    out = partial_ptr + chunk.to(tl.int64) * (5 * C) + col
    tl.store(out + 0 * C, tl.sum(s_g, axis=0), mask=col_ok)
    tl.store(out + 1 * C, tl.sum(s_gx, axis=0), mask=col_ok)
    if HAS_U:
        tl.store(out + 2 * C, tl.sum(s_u, axis=0), mask=col_ok)
        tl.store(out + 3 * C, tl.sum(s_ux, axis=0), mask=col_ok)
        tl.store(out + 4 * C, tl.sum(s_ug, axis=0), mask=col_ok)


@triton.jit
def _bn_rows_grads_kernel(
    u_ptr, u_gamma_ptr, u_beta_ptr, g_ptr, x_ptr, gamma_ptr, mean_ptr, invstd_ptr, partial_ptr,
    grad_g_ptr, grad_x_ptr, grad_gamma_ptr,
    R, C, rows_per_chunk, chunks, u_row_stride, u_col_stride, g_row_stride, g_col_stride, x_row_stride,
    x_col_stride,
    HAS_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < C
    mean = tl.load(mean_ptr + col, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + col, mask=col_ok, other=0.0)
    gamma = tl.load(gamma_ptr + col, mask=col_ok, other=0.0)
    u_gamma = tl.load(u_gamma_ptr + col, mask=col_ok, other=0.0)
    u_beta = tl.load(u_beta_ptr + col, mask=col_ok, other=0.0)
    dtype = mean.dtype

    # The sums over all rows: every chunk's partial, in chunk order.
    s_g = tl.zeros([BLOCK_C], dtype=dtype)
    s_gx = tl.zeros([BLOCK_C], dtype=dtype)
    s_u = tl.zeros([BLOCK_C], dtype=dtype)
    s_ux = tl.zeros([BLOCK_C], dtype=dtype)
    s_ug = tl.zeros([BLOCK_C], dtype=dtype)
    part = partial_ptr + col
    for _ in range(0, chunks):
        s_g += tl.load(part + 0 * C, mask=col_ok, other=0.0)
        s_gx += tl.load(part + 1 * C, mask=col_ok, other=0.0)
        if HAS_U:
            s_u += tl.load(part + 2 * C, mask=col_ok, other=0.0)
            s_ux += tl.load(part + 3 * C, mask=col_ok, other=0.0)
            s_ug += tl.load(part + 4 * C, mask=col_ok, other=0.0)
        part += 5 * C

    # Per-channel coefficients (csrc/cpu/batch_norm_kernels.inc): with r = invstd,
    #   d input    = a_u*u + a_g*g + a_x*x_hat + a_1,   d grad_out = b_u*u + b_x*x_hat + b_1.
    rows = tl.zeros([BLOCK_C], dtype=dtype) + R  # R > 0 (the launcher answers an empty matrix itself)
    inv_rows = 1.0 / rows
    g_bar = s_g * inv_rows
    m1 = s_gx * inv_rows
    u_bar = s_u * inv_rows
    mux = s_ux * inv_rows
    mug = s_ug * inv_rows
    gr = gamma * invstd
    gr2 = gr * invstd
    K = mug - u_bar * g_bar - mux * m1
    a_u = -gr2 * m1
    a_g = u_gamma * invstd - gr2 * mux
    a_x = -gr2 * K + 2.0 * gr2 * m1 * mux - u_gamma * invstd * m1
    a_1 = gr2 * m1 * u_bar - a_g * g_bar
    b_u = gr
    b_x = u_gamma - gr * mux
    b_1 = u_beta - gr * u_bar
    if chunk == 0:
        tl.store(grad_gamma_ptr + col, invstd * rows * K, mask=col_ok)

    first = chunk * rows_per_chunk
    end = tl.minimum(first + rows_per_chunk, R)
    for start in range(first, end, BLOCK_R):
        row = (start + tl.arange(0, BLOCK_R)).to(tl.int64)
        ok = (row < end)[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + row[:, None] * g_row_stride + col[None, :] * g_col_stride, mask=ok, other=0.0)
        x = tl.load(x_ptr + row[:, None] * x_row_stride + col[None, :] * x_col_stride, mask=ok, other=0.0)
        x_hat = (x - mean[None, :]) * invstd[None, :]
        d_x = a_g[None, :] * g + a_x[None, :] * x_hat + a_1[None, :]
        d_g = b_x[None, :] * x_hat + b_1[None, :]
        if HAS_U:
            u = tl.load(u_ptr + row[:, None] * u_row_stride + col[None, :] * u_col_stride, mask=ok, other=0.0)
            d_x += a_u[None, :] * u
            d_g += b_u[None, :] * u
        out = row[:, None] * C + col[None, :]  # the outputs are contiguous [R, C]
        tl.store(grad_x_ptr + out, d_x, mask=ok)
        tl.store(grad_g_ptr + out, d_g, mask=ok)
