"""Triton kernels for the masked (structure-gated) conv2d and linear layers (SPEC section 2).

The kernels `_conv_forward_kernel`, `_conv_input_grad_kernel`, `_conv_weight_grad_kernel` and
`_sum_splits_kernel`; their launcher is ``neuronml_fast/ops/masked/triton.py``, beside the
reference, the custom ops and the other backends' launchers of the op family.

Design:

* Implicit-GEMM convolution, NCHW, one launch for all tasks: the programs run over (block of
  pixels, block of channels, ``v = task * groups + group``), so every task (and group) uses its own
  weights, bias and mask. The grid is 1-D (`_tile_ids` unflattens it): its x axis takes 2^31 - 1
  blocks where y and z stop at 65535, which tasks x groups x splits or the pixel blocks of a large
  problem exceed.
* Pruning without host synchronization and without a planning launch: a (task, group)'s active
  channels, in increasing order, are its compacted *slots*, and each program derives the channels
  of its own block of slots from the group's mask row (`_slot_channels`: a prefix count in
  windows, which stops once the block is filled). A program whose slots are all past the active
  count computes nothing (compute follows the active fraction); the exact zeros of the pruned
  channels are written by the program whose block of *channels* holds them, so every output
  element is written exactly once. The input-gradient kernel walks the active channels of its
  group window by window (`_next_active`).
* ``mask * (conv + bias)`` is the forward epilogue; ``grad_out * mask + grad_pre`` is computed
  while loading the GEMM operand of both backward kernels (no materialized gy); the bias and
  mask gradients (the sensitivity source) are reduced inside the weight-gradient kernel, from
  the same tiles, instead of a separate pass.
* The weight gradient reduces over every output pixel. With few programs it is split over
  pixels; each split writes its partial sums in the accumulation dtype and `_sum_splits_kernel`
  adds them in a fixed order (deterministic, unlike atomics) and writes the weight, bias and mask
  gradients in the output dtype, in one launch. Without a split the kernel writes them itself.
* A linear layer is the 1x1 convolution of a 1x1 image: the same kernels serve it.
* Accumulation in float32 (float64 for float64 inputs). The GEMM operands stay in the input
  dtype (gy is rounded to it, as an fp16/bf16 autograd would): 16-bit dots run on tensor cores.
  float32 dots take ``DOT_PRECISION``, which the launcher decides from torch's switches
  (``neuronml_fast/ops/masked/gpu.py``, `dot_precision`): "tf32" on the tensor cores where torch's
  own conv (or, for the linear layers, matmul) would use TF32, "ieee" (exact float32 products on
  FMA) otherwise. float64 takes the FMA path (``USE_DOT`` False): Triton has no fp64 tensor-core dot.
"""

import triton
import triton.language as tl

# Pixels of one task the kernels index in 32 bits (with a block of headroom).
MAX_PIXELS = 2**31 - 1 - 1024


@triton.jit
def _dot(a, b, acc, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)


@triton.jit
def _tile_ids(M_BLOCKS, N_BLOCKS):
    """(block along M, block along N, rest) of this program in the flat grid, M fastest."""
    pid = tl.program_id(0)
    rest = pid // M_BLOCKS
    return pid % M_BLOCKS, rest % N_BLOCKS, rest // N_BLOCKS


@triton.jit
def _kept(mask_row_ptr, channel, COUT_G, SKIP_ZERO: tl.constexpr):
    """Which of these channels of a group (its mask row at ``mask_row_ptr``) are computed: those
    whose mask is not 0 under skip_zero, every channel otherwise."""
    in_range = (channel >= 0) & (channel < COUT_G)
    if SKIP_ZERO:
        return in_range & (tl.load(mask_row_ptr + channel, mask=in_range, other=0.0) != 0)
    return in_range


@triton.jit
def _slot_channels(mask_row_ptr, COUT_G, slot_start, SKIP_ZERO: tl.constexpr, BLOCK: tl.constexpr,
                   SCAN: tl.constexpr):
    """The channels (within the group) in compacted slots [slot_start, slot_start + BLOCK): slot s
    holds the group's s-th active channel. Returns (channel, active): ``active`` is False for a
    slot past the last active channel (its channel is then 0)."""
    slots = slot_start + tl.arange(0, BLOCK)
    if not SKIP_ZERO:
        return slots, slots < COUT_G
    channel = tl.zeros([BLOCK], dtype=tl.int32)
    hits = tl.zeros([BLOCK], dtype=tl.int32)
    before = slot_start * 0  # active channels before the window
    c0 = slot_start * 0
    while (c0 < COUT_G) & (before < slot_start + BLOCK):
        c = c0 + tl.arange(0, SCAN)
        keep = _kept(mask_row_ptr, c, COUT_G, True).to(tl.int32)
        rank = before + tl.cumsum(keep, 0) - 1  # the slot of each active channel of the window
        hit = (keep[None, :] != 0) & (rank[None, :] == slots[:, None])  # [BLOCK, SCAN]: one hit per slot at most
        channel += tl.sum(tl.where(hit, c[None, :], 0), axis=1)
        hits += tl.sum(hit.to(tl.int32), axis=1)
        before += tl.sum(keep, 0)
        c0 += SCAN
    return channel, hits > 0


@triton.jit
def _next_active(mask_row_ptr, COUT_G, c0, SKIP_ZERO: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr):
    """The next (up to) BLOCK active channels of a group from channel c0 on, looked for in the window
    [c0, c0 + SCAN): (channel, valid, where the next search starts)."""
    c = c0 + tl.arange(0, SCAN)
    keep = _kept(mask_row_ptr, c, COUT_G, SKIP_ZERO)
    rank = tl.cumsum(keep.to(tl.int32), 0) - 1
    take = keep & (rank < BLOCK)
    hit = take[None, :] & (rank[None, :] == tl.arange(0, BLOCK)[:, None])  # [BLOCK, SCAN]
    channel = tl.sum(tl.where(hit, c[None, :], 0), axis=1)
    valid = tl.sum(hit.to(tl.int32), axis=1) > 0
    taken = tl.sum(take.to(tl.int32), 0)
    last = tl.max(tl.where(take, c, -1), 0)
    return channel, valid, tl.where(taken == BLOCK, last + 1, c0 + SCAN)


@triton.jit
def _conv_forward_kernel(
    x_ptr, w_ptr, mask_ptr, bias_ptr, out_ptr, pre_ptr,
    N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, SKIP_ZERO: tl.constexpr,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCAN: tl.constexpr,
):
    pid_m, pid_n, v = _tile_ids(tl.cdiv(N * HO * WO, BLOCK_M), tl.cdiv(COUT_G, BLOCK_N))
    t, g = v // G, v % G
    mask_row = mask_ptr + t * COUT + g * COUT_G
    channel, active = _slot_channels(mask_row, COUT_G, pid_n * BLOCK_N, SKIP_ZERO, BLOCK_N, SCAN)
    oc = g * COUT_G + channel  # output channel of each slot
    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel over (n, ho, wo)
    pix_ok = pix < N * HO * WO
    n, p = pix // (HO * WO), pix % (HO * WO)
    ho, wo = p // WO, p % WO
    image = (t * N + n).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if tl.max(active.to(tl.int32), 0) > 0:  # blocks of slots past the active count skip the GEMM
        K = CIN_G * KH * KW
        x_base = image * CIN + g * CIN_G
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
            acc = _dot(a, b, acc, USE_DOT, DOT_PRECISION)
        mval = tl.load(mask_ptr + t * COUT + oc, mask=active, other=0.0).to(ACC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + t * COUT + oc, mask=active, other=0.0).to(ACC)[None, :]
        offset = (image[:, None] * COUT + oc[None, :]) * (HO * WO) + p[:, None]
        store_ok = pix_ok[:, None] & active[None, :]
        tl.store(out_ptr + offset, (acc * mval[None, :]).to(out_ptr.dtype.element_ty), mask=store_ok)
        tl.store(pre_ptr + offset, acc.to(pre_ptr.dtype.element_ty), mask=store_ok)
    if SKIP_ZERO:  # the exact zeros of the pruned channels of this block of channels
        own = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        pruned = (own < COUT_G) & ~_kept(mask_row, own, COUT_G, True)
        offset = (image[:, None] * COUT + (g * COUT_G + own)[None, :]) * (HO * WO) + p[:, None]
        zero_ok = pix_ok[:, None] & pruned[None, :]
        tl.store(out_ptr + offset, tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty), mask=zero_ok)
        tl.store(pre_ptr + offset, tl.zeros([BLOCK_M, BLOCK_N], dtype=pre_ptr.dtype.element_ty), mask=zero_ok)


@triton.jit
def _load_gy(go_ptr, gp_ptr, offset, ok, mval, HAS_GP: tl.constexpr, ACC: tl.constexpr):
    """gy = grad_out * mask (+ grad_pre), fused into the operand load of the backward GEMMs."""
    gy = tl.load(go_ptr + offset, mask=ok, other=0.0).to(ACC) * mval
    if HAS_GP:
        gy += tl.load(gp_ptr + offset, mask=ok, other=0.0).to(ACC)
    return gy


@triton.jit
def _conv_input_grad_kernel(
    go_ptr, gp_ptr, w_ptr, mask_ptr, gx_ptr,
    N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_GP: tl.constexpr, SKIP_ZERO: tl.constexpr, ACC: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SCAN: tl.constexpr,
):
    # grad_input[pixel, ci] = sum over active channels j and taps (kh, kw) of gy[out pixel, j] * w[j, ci, kh, kw]
    pid_m, pid_n, v = _tile_ids(tl.cdiv(N * H * W, BLOCK_M), tl.cdiv(CIN_G, BLOCK_N))
    t, g = v // G, v % G
    mask_row = mask_ptr + t * COUT + g * COUT_G
    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixel over (n, h, w)
    pix_ok = pix < N * H * W
    n, q = pix // (H * W), pix % (H * W)
    h, w = q // W, q % W
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < CIN_G
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    go_base = (t * N + n).to(tl.int64) * COUT
    c0 = pid_m * 0
    while c0 < COUT_G:  # BLOCK_K active channels at a time
        channel, slot_ok, c0 = _next_active(mask_row, COUT_G, c0, SKIP_ZERO, BLOCK_K, SCAN)
        oc = g * COUT_G + channel
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
            acc = _dot(gy.to(wt.dtype), wt, acc, USE_DOT, DOT_PRECISION)
    offset = ((t * N + n).to(tl.int64)[:, None] * CIN + g * CIN_G + ci[None, :]) * (H * W) + q[:, None]
    tl.store(gx_ptr + offset, acc.to(gx_ptr.dtype.element_ty), mask=pix_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_weight_grad_kernel(
    go_ptr, gp_ptr, pre_ptr, x_ptr, mask_ptr, gw_ptr, gb_ptr, gm_ptr,
    N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G, SPLITS, PIX_PER_SPLIT, SPLIT_STRIDE, GB_OFFSET, GM_OFFSET,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_GP: tl.constexpr, HAS_PRE: tl.constexpr, SKIP_ZERO: tl.constexpr,
    COMPUTE_GW: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCAN: tl.constexpr,
):
    # grad_weight[j, (ci, kh, kw)] = sum over output pixels of gy[pixel, j] * x[patch(pixel), ci, kh, kw],
    # over the pixels of one split (the slowest grid dimension is v * SPLITS + split); the first
    # column block also reduces grad_bias = sum gy and grad_mask = sum grad_out * pre from the
    # same gy tiles. Split s writes at gw_ptr + s * SPLIT_STRIDE (and gb, gm at their offsets
    # from there): the final gradients when SPLITS == 1, partial sums for `_sum_splits_kernel`
    # otherwise.
    K = CIN_G * KH * KW
    col_blocks = 1
    if COMPUTE_GW:
        col_blocks = tl.cdiv(K, BLOCK_N)
    pid_m, pid_n, pid_z = _tile_ids(tl.cdiv(COUT_G, BLOCK_M), col_blocks)
    v, split = pid_z // SPLITS, pid_z % SPLITS
    t, g = v // G, v % G
    mask_row = mask_ptr + t * COUT + g * COUT_G
    channel, active = _slot_channels(mask_row, COUT_G, pid_m * BLOCK_M, SKIP_ZERO, BLOCK_M, SCAN)
    oc = g * COUT_G + channel
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < K
    ci, r = col // (KH * KW), col % (KH * KW)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    sum_gy = tl.zeros([BLOCK_M], dtype=ACC)
    sum_mask = tl.zeros([BLOCK_M], dtype=ACC)
    reduce_here = pid_n == 0
    split_base = split.to(tl.int64) * SPLIT_STRIDE
    # The zeros of the pruned channels of this block of channels, first: nothing of this stays live
    # through the GEMM loop (all channels are computed under skip_zero=False, so none).
    if SKIP_ZERO:
        own = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pruned = (own < COUT_G) & ~_kept(mask_row, own, COUT_G, True)
        zero_row = (t * COUT + g * COUT_G + own).to(tl.int64)
        if COMPUTE_GW:
            tl.store(gw_ptr + split_base + zero_row[:, None] * K + col[None, :],
                     tl.zeros([BLOCK_M, BLOCK_N], dtype=gw_ptr.dtype.element_ty),
                     mask=pruned[:, None] & col_ok[None, :])
        if reduce_here:
            zeros = tl.zeros([BLOCK_M], dtype=gb_ptr.dtype.element_ty)
            tl.store(gb_ptr + GB_OFFSET + split_base + zero_row, zeros, mask=pruned)
            tl.store(gm_ptr + GM_OFFSET + split_base + zero_row, zeros.to(gm_ptr.dtype.element_ty), mask=pruned)
    if tl.max(active.to(tl.int32), 0) > 0:
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
                acc = _dot(gy.to(xt.dtype), xt, acc, USE_DOT, DOT_PRECISION)
            if reduce_here:
                sum_gy += tl.sum(gy, axis=1)
                if HAS_PRE:
                    go = tl.load(go_ptr + offset, mask=ok, other=0.0).to(ACC)
                    pre = tl.load(pre_ptr + offset, mask=ok, other=0.0).to(ACC)
                    sum_mask += tl.sum(go * pre, axis=1)
        row = (t * COUT + oc).to(tl.int64)
        if COMPUTE_GW:
            tl.store(gw_ptr + split_base + row[:, None] * K + col[None, :], acc.to(gw_ptr.dtype.element_ty),
                     mask=active[:, None] & col_ok[None, :])
        if reduce_here:
            tl.store(gb_ptr + GB_OFFSET + split_base + row, sum_gy.to(gb_ptr.dtype.element_ty), mask=active)
            tl.store(gm_ptr + GM_OFFSET + split_base + row, sum_mask.to(gm_ptr.dtype.element_ty), mask=active)


@triton.jit
def _sum_splits_kernel(part_ptr, gw_ptr, gb_ptr, gm_ptr, SPLITS, SPLIT_STRIDE, N_W, N_B, BLOCK: tl.constexpr):
    """The weight-gradient partial sums ``part [SPLITS, SPLIT_STRIDE]`` (rows: N_W weight-gradient
    elements, then N_B bias-gradient and N_B mask-gradient ones) added in split order, written
    to the three gradients in their dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N_W + 2 * N_B
    acc = tl.load(part_ptr + i, mask=ok, other=0.0)
    offset = i
    for _ in range(1, SPLITS):
        offset += SPLIT_STRIDE
        acc += tl.load(part_ptr + offset, mask=ok, other=0.0)
    tl.store(gw_ptr + i, acc.to(gw_ptr.dtype.element_ty), mask=i < N_W)
    b = i - N_W
    tl.store(gb_ptr + b, acc.to(gb_ptr.dtype.element_ty), mask=(b >= 0) & (b < N_B))
    m = b - N_B
    tl.store(gm_ptr + m, acc.to(gm_ptr.dtype.element_ty), mask=(m >= 0) & (m < N_B))
