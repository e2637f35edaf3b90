"""Triton kernels for the masked (structure-gated) conv2d and linear layers (SPEC section 2).

The kernels `_conv_forward_kernel`, `_conv_input_grad_kernel` and `_conv_weight_grad_kernel`;
their launcher is ``neuronml_fast/ops/masked/triton.py``, beside the reference, the custom ops
and the other backends' launchers of the op family.

Design:

* Implicit-GEMM convolution, NCHW, one launch for all tasks: the programs run over (block of
  pixels, block of channels, ``v = task * groups + group``), so every task (and group) uses its own
  weights, bias and mask. The grid is 1-D (`_tile_ids` unflattens it): its x axis takes 2^31 - 1
  blocks where y and z stop at 65535, which tasks x groups x splits or the pixel blocks of a large
  problem exceed.
* Pruning without host synchronization: per (task, group) the channels are ordered active
  first (``order``) and counted (``count``) on the device. A program whose block of slots lies
  past ``count`` computes nothing (compute follows the active fraction) but still writes its
  pruned channels as exact zeros, so every output element is written exactly once.
* ``mask * (conv + bias)`` is the forward epilogue; ``grad_out * mask + grad_pre`` is computed
  while loading the GEMM operand of both backward kernels (no materialized gy); the bias and
  mask gradients (the sensitivity source) are reduced inside the weight-gradient kernel, from
  the same tiles, instead of a separate pass.
* A linear layer is the 1x1 convolution of a 1x1 image: the same kernels serve it.
* Accumulation in float32 (float64 for float64 inputs); ``tl.dot`` in IEEE float32 (no TF32)
  so that results match the reference to rounding. The GEMM operands stay in the input dtype
  (gy is rounded to it, as an fp16/bf16 autograd would): 16-bit dots run on tensor cores.
"""

import triton
import triton.language as tl

# Pixels of one task the kernels index in 32 bits (with a block of headroom).
MAX_PIXELS = 2**31 - 1 - 1024


@triton.jit
def _dot(a, b, acc, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)


@triton.jit
def _tile_ids(M_BLOCKS, N_BLOCKS):
    """(block along M, block along N, rest) of this program in the flat grid, M fastest."""
    pid = tl.program_id(0)
    rest = pid // M_BLOCKS
    return pid % M_BLOCKS, rest % N_BLOCKS, rest // N_BLOCKS


@triton.jit
def _slots(order_ptr, count_ptr, v, slot_start, COUT_G, BLOCK: tl.constexpr):
    """Channels (within the group) of a block of slots, and which of them are active."""
    slots = slot_start + tl.arange(0, BLOCK)
    in_range = slots < COUT_G
    channel = tl.load(order_ptr + v * COUT_G + slots, mask=in_range, other=0)
    count = tl.load(count_ptr + v)
    return channel, in_range, in_range & (slots < count), count


@triton.jit
def _conv_forward_kernel(
    x_ptr, w_ptr, mask_ptr, bias_ptr, order_ptr, count_ptr, out_ptr, pre_ptr,
    N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PRE: tl.constexpr,
    ACC: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, v = _tile_ids(tl.cdiv(N * HO * WO, BLOCK_M), tl.cdiv(COUT_G, BLOCK_N))
    t, g = v // G, v % G
    channel, in_range, active, count = _slots(order_ptr, count_ptr, v, pid_n * BLOCK_N, COUT_G, BLOCK_N)
    oc = g * COUT_G + channel  # output channel
    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel over (n, ho, wo)
    pix_ok = pix < N * HO * WO
    n, p = pix // (HO * WO), pix % (HO * WO)
    ho, wo = p // WO, p % WO
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if pid_n * BLOCK_N < count:  # blocks of pruned neurons only write zeros
        K = CIN_G * KH * KW
        x_base = (t * N + n).to(tl.int64) * CIN + g * CIN_G
        w_base = (t * COUT + oc).to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            ci, r = k // (KH * KW), k % (KH * KW)
            hi = ho[:, None] * STRIDE_H - PAD_H + (r // KW)[None, :] * DIL_H
            wi = wo[:, None] * STRIDE_W - PAD_W + (r % KW)[None, :] * DIL_W
            a_ok = pix_ok[:, None] & k_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load(x_ptr + ((x_base[:, None] + ci[None, :]) * H + hi) * W + wi, mask=a_ok, other=0.0)
            b = tl.load(w_ptr + w_base[None, :] + k[:, None], mask=k_ok[:, None] & active[None, :], other=0.0)
            acc = _dot(a, b, acc, USE_DOT)
    mval = tl.load(mask_ptr + t * COUT + oc, mask=active, other=0.0).to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + t * COUT + oc, mask=active, other=0.0).to(ACC)[None, :]
    pre = tl.where(active[None, :], acc, 0.0)
    out = tl.where(active[None, :], pre * mval[None, :], 0.0)
    offset = ((t * N + n).to(tl.int64)[:, None] * COUT + oc[None, :]) * (HO * WO) + p[:, None]
    store_ok = pix_ok[:, None] & in_range[None, :]
    tl.store(out_ptr + offset, out.to(out_ptr.dtype.element_ty), mask=store_ok)
    if WRITE_PRE:
        tl.store(pre_ptr + offset, pre.to(pre_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _load_gy(go_ptr, gp_ptr, offset, ok, mval, HAS_GP: tl.constexpr, ACC: tl.constexpr):
    """gy = grad_out * mask (+ grad_pre), fused into the operand load of the backward GEMMs."""
    gy = tl.load(go_ptr + offset, mask=ok, other=0.0).to(ACC) * mval
    if HAS_GP:
        gy += tl.load(gp_ptr + offset, mask=ok, other=0.0).to(ACC)
    return gy


@triton.jit
def _conv_input_grad_kernel(
    go_ptr, gp_ptr, w_ptr, mask_ptr, order_ptr, count_ptr, gx_ptr,
    N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_GP: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_input[pixel, ci] = sum over active slots j and taps (kh, kw) of gy[out pixel, j] * w[j, ci, kh, kw]
    pid_m, pid_n, v = _tile_ids(tl.cdiv(N * H * W, BLOCK_M), tl.cdiv(CIN_G, BLOCK_N))
    t, g = v // G, v % G
    count = tl.load(count_ptr + v)
    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixel over (n, h, w)
    pix_ok = pix < N * H * W
    n, q = pix // (H * W), pix % (H * W)
    h, w = q // W, q % W
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < CIN_G
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    go_base = (t * N + n).to(tl.int64) * COUT
    for j0 in range(0, count, BLOCK_K):
        slots = j0 + tl.arange(0, BLOCK_K)
        slot_ok = slots < count
        oc = g * COUT_G + tl.load(order_ptr + v * COUT_G + slots, mask=slot_ok, other=0)
        mval = tl.load(mask_ptr + t * COUT + oc, mask=slot_ok, other=0.0).to(ACC)
        w_row = (t * COUT + oc).to(tl.int64) * CIN_G
        # A runtime loop over the taps: unrolled (49 taps for 7x7), the software pipeliner takes
        # minutes to compile the kernel.
        for r in range(KH * KW):
            hn = h + PAD_H - (r // KW) * DIL_H
            wn = w + PAD_W - (r % KW) * DIL_W
            ho, wo = hn // STRIDE_H, wn // STRIDE_W
            hit = pix_ok & (hn >= 0) & (wn >= 0) & (hn % STRIDE_H == 0) & (wn % STRIDE_W == 0) & (ho < HO) & (wo < WO)
            offset = (go_base[:, None] + oc[None, :]) * (HO * WO) + (ho * WO + wo)[:, None]
            gy = _load_gy(go_ptr, gp_ptr, offset, hit[:, None] & slot_ok[None, :], mval[None, :], HAS_GP, ACC)
            wt = tl.load(w_ptr + (w_row[:, None] + ci[None, :]) * (KH * KW) + r,
                         mask=slot_ok[:, None] & ci_ok[None, :], other=0.0)
            acc = _dot(gy.to(wt.dtype), wt, acc, USE_DOT)
    offset = ((t * N + n).to(tl.int64)[:, None] * CIN + g * CIN_G + ci[None, :]) * (H * W) + q[:, None]
    tl.store(gx_ptr + offset, acc.to(gx_ptr.dtype.element_ty), mask=pix_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_weight_grad_kernel(
    go_ptr, gp_ptr, pre_ptr, x_ptr, mask_ptr, order_ptr, count_ptr, gw_ptr, gb_ptr, gm_ptr,
    T, N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G, SPLITS, PIX_PER_SPLIT,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_GP: tl.constexpr, HAS_PRE: tl.constexpr,
    COMPUTE_GW: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_weight[j, (ci, kh, kw)] = sum over output pixels of gy[pixel, j] * x[patch(pixel), ci, kh, kw],
    # split over pixels (the slowest grid dimension is v * SPLITS + split) into partial sums
    # [SPLITS, T, C_out, ...]; the first column block also reduces grad_bias = sum gy and
    # grad_mask = sum grad_out * pre from the same gy tiles.
    K = CIN_G * KH * KW
    col_blocks = 1
    if COMPUTE_GW:
        col_blocks = tl.cdiv(K, BLOCK_N)
    pid_m, pid_n, pid_z = _tile_ids(tl.cdiv(COUT_G, BLOCK_M), col_blocks)
    v, split = pid_z // SPLITS, pid_z % SPLITS
    t, g = v // G, v % G
    channel, in_range, active, count = _slots(order_ptr, count_ptr, v, pid_m * BLOCK_M, COUT_G, BLOCK_M)
    oc = g * COUT_G + channel
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < K
    ci, r = col // (KH * KW), col % (KH * KW)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    sum_gy = tl.zeros([BLOCK_M], dtype=ACC)
    sum_mask = tl.zeros([BLOCK_M], dtype=ACC)
    reduce_here = pid_n == 0
    if pid_m * BLOCK_M < count:
        mval = tl.load(mask_ptr + t * COUT + oc, mask=active, other=0.0).to(ACC)
        start = split * PIX_PER_SPLIT
        stop = tl.minimum(start + PIX_PER_SPLIT, N * HO * WO)
        for p0 in range(start, stop, BLOCK_K):
            pix = p0 + tl.arange(0, BLOCK_K)
            pix_ok = pix < stop
            n, p = pix // (HO * WO), pix % (HO * WO)
            ho, wo = p // WO, p % WO
            offset = ((t * N + n).to(tl.int64)[None, :] * COUT + oc[:, None]) * (HO * WO) + p[None, :]
            ok = active[:, None] & pix_ok[None, :]
            gy = _load_gy(go_ptr, gp_ptr, offset, ok, mval[:, None], HAS_GP, ACC)  # [slots, pixels]
            if COMPUTE_GW:
                hi = ho[:, None] * STRIDE_H - PAD_H + (r // KW)[None, :] * DIL_H
                wi = wo[:, None] * STRIDE_W - PAD_W + (r % KW)[None, :] * DIL_W
                x_ok = pix_ok[:, None] & col_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                x_off = (((t * N + n).to(tl.int64)[:, None] * CIN + g * CIN_G + ci[None, :]) * H + hi) * W + wi
                xt = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)  # [pixels, cols]
                acc = _dot(gy.to(xt.dtype), xt, acc, USE_DOT)
            if reduce_here:
                sum_gy += tl.sum(gy, axis=1)
                if HAS_PRE:
                    go = tl.load(go_ptr + offset, mask=ok, other=0.0).to(ACC)
                    pre = tl.load(pre_ptr + offset, mask=ok, other=0.0).to(ACC)
                    sum_mask += tl.sum(go * pre, axis=1)
    row = (split * T + t).to(tl.int64) * COUT + oc  # partial-sum row of this split
    if COMPUTE_GW:
        tl.store(gw_ptr + row[:, None] * K + col[None, :], acc, mask=in_range[:, None] & col_ok[None, :])
    if reduce_here:
        tl.store(gb_ptr + row, sum_gy, mask=in_range)
        tl.store(gm_ptr + row, sum_mask, mask=in_range)
