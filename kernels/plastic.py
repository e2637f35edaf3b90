"""Triton kernels for the plastic layers (SPEC section 4).

The time loop runs inside the kernels: one launch for a whole forward, one for a whole backward and
one that reduces the backward's per-sequence partial sums. Their launcher is
``neuronml_fast/ops/plastic/triton.py`` (beside the reference, the custom op and the other
backends' launchers). Same algorithm and memory contract as the C++ CPU backend
(csrc/cpu/plastic.cpp); docs/design.md gives each design's bytes per step.

One program per sequence, looping over the steps. The interpreter runs programs one after
another, so a barrier between programs could not be interpreted: a program walks every block of
its sequence's rows itself, and ``tl.debug_barrier()`` separates a step's phases where the program
reads back what its own threads wrote (the step's outputs, the trace between passes).

* ``_forward_resident_kernel`` (a tile of at most ``RESIDENT_MAX_TILE_BYTES``: a recurrent layer
  of N <= 64, a linear one of up to 64 x 128 in float32): weight, alpha and the trace stay in
  registers for all T steps; the trace is read once and written once per call.
* ``_forward_kernel`` (any size): the trace streams through global memory, one read and one write
  per step. The update of step t-1 is applied as the tile is read for step t's pre-activation
  (H_t = rule(H_{t-1}, pre_{t-1}, y_{t-1}, M_{t-1}), then z_t from H_t), so every rule, the clip and
  the endogenous modulator (whose M_{t-1} needs all of y_{t-1}, known once step t-1 has finished)
  take one pass over the trace per step.
* ``_backward_kernel``: the reverse walk, two passes per step: rows (H_t reconstructed from
  H_{t+1}, or read from the segment recomputed forward from its checkpoint; the rule's share of
  dL/dy_t and dL/dM_t), then columns (dL/dH_t, alpha, eta and the presynaptic gradient, complete
  per column since a program owns every row). Endogenous modulation: between the two, dL/ds_t
  from every row's dL/dM_t, and its share of dL/dy_t through mod_weight.
* ``_reduce_kernel``: the per-sequence partial sums (alpha, eta, the modulator's parameters) summed
  over the sequences, in a fixed order: deterministic, no atomics.
* Dtypes: the inputs, the parameters and the outputs in the caller's dtype; the trace, y_t as
  the kernels read it back (``out_ptr``), every scratch buffer and every sum in ``ACC`` (float32
  for 16-bit inputs: a 16-bit trace would round away the small Hebbian increments it adds up
  over hundreds of steps). With ``NARROW`` (16-bit inputs) the kernels store y_t, dL/dz_t and
  dL/dpre_t once more in the caller's dtype where they are final (``narrow_ptr``,
  ``gz_out_ptr``, ``gpre_out_ptr``); stores convert to their pointer's dtype.
* Offsets: across sequences and steps in 64 bits; within one sequence's [OUT, IN] matrix in 32
  bits, which the launchers guarantee (`MAX_MATRIX`).
"""

import triton
import triton.language as tl

from ..ops.plastic import rules

# The rule codes (neuronml_fast/ops/plastic/rules.py), as compile-time constants of the kernels.
HEBB: tl.constexpr = tl.constexpr(rules.HEBB)
OJA: tl.constexpr = tl.constexpr(rules.OJA)
MODULATED: tl.constexpr = tl.constexpr(rules.MODULATED)

# One [OUT, IN] tile of the resident forward; it holds three (weight, alpha, trace) in registers.
# 32 KB a tile is 96 accumulation-dtype values per thread on 8 warps, within a thread's registers;
# a 128 x 128 float32 tile (16 warps, 128 registers a thread) spills, and streaming the trace
# through L2 beats spilling it to local memory at every step.
RESIDENT_MAX_N = 128
RESIDENT_MAX_TILE_BYTES = 32 * 1024


def resident_max_square(itemsize):
    """The largest N (a power of two) whose N x N tile of ``itemsize``-byte values the resident forward takes."""
    n = RESIDENT_MAX_N
    while n * n * itemsize > RESIDENT_MAX_TILE_BYTES:
        n //= 2
    return n
MAX_MATRIX = 2**31 - 1  # elements of one sequence's [OUT, IN] trace, indexed in 32 bits


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): exact limits at +-inf, no libdevice needed (works in the interpreter).
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _update(h, p, y, eta, m, clip, RULE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """H' = rule(H) for a tile: h [rows, cols], p [cols] (pre), y [rows] (post), m [rows]."""
    if RULE == HEBB:
        h = (1.0 - eta) * h + eta * y[:, None] * p[None, :]
    elif RULE == OJA:
        h = h + eta * y[:, None] * (p[None, :] - y[:, None] * h)
    else:
        h = h + m[:, None] * y[:, None] * p[None, :]
    if HAS_CLIP:
        h = tl.minimum(tl.maximum(h, -clip), clip)
    return h


@triton.jit
def _clip_mask(g, h, p, y, eta, m, clip, RULE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """dL/dH' with the entries the clip held at its bound zeroed (the unclipped update left [-clip, clip])."""
    if HAS_CLIP:
        nxt = _update(h, p, y, eta, m, clip, RULE, False)
        g = tl.where((nxt < -clip) | (nxt > clip), 0.0, g)
    return g


@triton.jit
def _pre(x_ptr, y0_ptr, out_ptr, t, seq, B, IN, cols, ok, RECURRENT: tl.constexpr, HAS_Y0: tl.constexpr,
         ACC: tl.constexpr):
    """pre_t[cols] where `ok` (zeros elsewhere): x_t, or y_{t-1} with y0 (or zeros) at t = 0."""
    if RECURRENT:
        p = tl.load(out_ptr + ((t - 1) * B + seq) * IN + cols, mask=ok & (t > 0), other=0.0).to(ACC)
        if HAS_Y0:
            p += tl.load(y0_ptr + seq * IN + cols, mask=ok & (t == 0), other=0.0).to(ACC)
        return p
    return tl.load(x_ptr + (t * B + seq) * IN + cols, mask=ok, other=0.0).to(ACC)


@triton.jit
def _modulation(mod_ptr, fanout_ptr, activity, t, seq, B, OUT, rows, ok, PER_NEURON: tl.constexpr,
                ENDOGENOUS: tl.constexpr, HAS_FANOUT: tl.constexpr, ACC: tl.constexpr):
    """M_t[rows] of sequence seq: given per row or per sequence, or the modulator's
    fanout[rows] * activity (its output at step t; a fanout of ones when not given)."""
    if ENDOGENOUS:
        if HAS_FANOUT:
            return tl.load(fanout_ptr + rows, mask=ok, other=0.0).to(ACC) * activity
        return tl.where(ok, activity, 0.0)
    if PER_NEURON:
        return tl.load(mod_ptr + (t * B + seq) * OUT + rows, mask=ok, other=0.0).to(ACC)
    return tl.load(mod_ptr + (t * B + seq) + rows * 0, mask=ok, other=0.0).to(ACC)  # one value, every row


@triton.jit
def _post(z, x_ptr, bias_ptr, drive_ptr, row, rows, row_ok, RECURRENT: tl.constexpr, HAS_BIAS: tl.constexpr,
          HAS_DRIVE: tl.constexpr, TANH: tl.constexpr, ACC: tl.constexpr):
    """y from the plastic part of z: + input_t (rnn) or + bias + drive_t (linear), then act."""
    if RECURRENT:
        z += tl.load(x_ptr + row, mask=row_ok, other=0.0).to(ACC)
    else:
        if HAS_BIAS:
            z += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        if HAS_DRIVE:
            z += tl.load(drive_ptr + row, mask=row_ok, other=0.0).to(ACC)
    return _tanh(z) if TANH else z


@triton.jit
def _activity(s, MOD_TANH: tl.constexpr):
    return _tanh(s) if MOD_TANH else s


@triton.jit
def _modulator_input(out_ptr, mw_ptr, mb_ptr, t, seq, B, N, valid, HAS_MOD_BIAS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    """s_t = mod_weight . y_t + mod_bias for sequence seq, y_t read back from the output (0 unless valid)."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = (cols < N) & valid
        y = tl.load(out_ptr + (t * B + seq) * N + cols, mask=ok, other=0.0).to(ACC)
        acc += y * tl.load(mw_ptr + cols, mask=ok, other=0.0).to(ACC)
    s = tl.sum(acc, axis=0)
    if HAS_MOD_BIAS:
        s += tl.load(mb_ptr).to(ACC)
    return s


@triton.jit
def _forward_resident_kernel(
    x_ptr, w_ptr, alpha_ptr, eta_ptr, bias_ptr, drive_ptr, y0_ptr, mod_ptr, hebb_ptr, trace_ptr, out_ptr, ckpt_ptr,
    activity_ptr, mw_ptr, mb_ptr, fanout_ptr, narrow_ptr, T, B, OUT, IN, clip: tl.float64, EVERY,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, ENDOGENOUS: tl.constexpr,
    MOD_TANH: tl.constexpr, HAS_MOD_BIAS: tl.constexpr, HAS_FANOUT: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRIVE: tl.constexpr,
    HAS_Y0: tl.constexpr, HAS_HEBB: tl.constexpr, NARROW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # One sequence, its whole [OUT, IN] matrix one register tile: z_t, y_t, (the modulator's
    # activity), then the update, all in registers.
    seq = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_O)
    cols = tl.arange(0, BLOCK_I)
    row_ok, col_ok = rows < OUT, cols < IN
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile = rows[:, None] * IN + cols[None, :]
    w = tl.load(w_ptr + tile, mask=tile_ok, other=0.0).to(ACC)
    if ALPHA_SCALAR:
        a = tl.load(alpha_ptr).to(ACC)
    else:
        a = tl.load(alpha_ptr + tile, mask=tile_ok, other=0.0).to(ACC)
    eta = tl.load(eta_ptr).to(ACC)
    bound = tl.full([], clip, ACC)  # exact: an fp64 argument, or a Python float in the interpreter
    trace = seq * OUT * IN
    if HAS_HEBB:
        h = tl.load(hebb_ptr + trace + tile, mask=tile_ok, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    if RECURRENT:
        p = _pre(x_ptr, y0_ptr, out_ptr, 0, seq, B, IN, cols, col_ok, RECURRENT, HAS_Y0, ACC)
    for t in range(T):
        if t % EVERY == 0:
            tl.store(ckpt_ptr + ((t // EVERY) * B + seq) * OUT * IN + tile, h, mask=tile_ok)
        row = (t * B + seq) * OUT + rows
        if not RECURRENT:
            p = tl.load(x_ptr + (t * B + seq) * IN + cols, mask=col_ok, other=0.0).to(ACC)
        z = tl.sum((w + a * h) * p[None, :], axis=1)
        y = _post(z, x_ptr, bias_ptr, drive_ptr, row, rows, row_ok, RECURRENT, HAS_BIAS, HAS_DRIVE, TANH, ACC)
        y = tl.where(row_ok, y, 0.0)
        tl.store(out_ptr + row, y, mask=row_ok)
        if NARROW:
            tl.store(narrow_ptr + row, y, mask=row_ok)
        activity = 0.0
        if ENDOGENOUS:
            s = tl.sum(y * tl.load(mw_ptr + rows, mask=row_ok, other=0.0).to(ACC), axis=0)
            if HAS_MOD_BIAS:
                s += tl.load(mb_ptr).to(ACC)
            activity = _activity(s, MOD_TANH)
            tl.store(activity_ptr + (t * B + seq), activity)
        m = y
        if RULE == MODULATED:
            m = _modulation(mod_ptr, fanout_ptr, activity, t, seq, B, OUT, rows, row_ok, PER_NEURON, ENDOGENOUS, HAS_FANOUT, ACC)
        h = tl.where(tile_ok, _update(h, p, y, eta, m, bound, RULE, HAS_CLIP), 0.0)
        if RECURRENT:
            p = tl.reshape(y, [BLOCK_I])  # this step's post is the next step's pre
    tl.store(trace_ptr + trace + tile, h, mask=tile_ok)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, alpha_ptr, eta_ptr, bias_ptr, drive_ptr, y0_ptr, mod_ptr, hebb_ptr, trace_ptr, out_ptr, ckpt_ptr,
    activity_ptr, mw_ptr, mb_ptr, fanout_ptr, narrow_ptr, T, B, OUT, IN, clip: tl.float64, EVERY,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, ENDOGENOUS: tl.constexpr,
    MOD_TANH: tl.constexpr, HAS_MOD_BIAS: tl.constexpr, HAS_FANOUT: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRIVE: tl.constexpr,
    HAS_Y0: tl.constexpr, HAS_HEBB: tl.constexpr, NARROW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # One sequence; its trace streams through trace_ptr. Pass t (t = 0..T) over the tiles: H_t (the
    # initial trace at t = 0, else step t-1's update of the stored H_{t-1}), stored (and kept as a
    # checkpoint every EVERY steps), and z_t from it; pass T only applies the last update.
    seq = tl.program_id(0).to(tl.int64)
    trace = seq * OUT * IN
    eta = tl.load(eta_ptr).to(ACC)
    bound = tl.full([], clip, ACC)  # exact: an fp64 argument, or a Python float in the interpreter
    activity = tl.zeros([1], dtype=ACC).sum(axis=0)  # the modulator's output of the previous step
    for t in range(T + 1):
        stepping = t < T
        ckpt = ((t // EVERY) * B + seq) * OUT * IN
        keep = stepping & (t % EVERY == 0)
        for r0 in range(0, OUT, BLOCK_O):
            rows = r0 + tl.arange(0, BLOCK_O)
            row_ok = rows < OUT
            y_prev = tl.load(out_ptr + ((t - 1) * B + seq) * OUT + rows, mask=row_ok & (t > 0), other=0.0).to(ACC)
            m_prev = y_prev
            if RULE == MODULATED:
                m_prev = _modulation(mod_ptr, fanout_ptr, activity, t - 1, seq, B, OUT, rows, row_ok & (t > 0),
                                     PER_NEURON, ENDOGENOUS, HAS_FANOUT, ACC)
            z = tl.zeros([BLOCK_O], dtype=ACC)
            for c0 in range(0, IN, BLOCK_I):
                cols = c0 + tl.arange(0, BLOCK_I)
                col_ok = cols < IN
                ok = row_ok[:, None] & col_ok[None, :]
                local = rows[:, None] * IN + cols[None, :]
                h = tl.load(trace_ptr + trace + local, mask=ok & (t > 0), other=0.0).to(ACC)
                if HAS_HEBB:
                    h += tl.load(hebb_ptr + trace + local, mask=ok & (t == 0), other=0.0).to(ACC)
                p_prev = _pre(x_ptr, y0_ptr, out_ptr, t - 1, seq, B, IN, cols, col_ok & (t > 0), RECURRENT, HAS_Y0,
                              ACC)
                h = tl.where(t > 0, _update(h, p_prev, y_prev, eta, m_prev, bound, RULE, HAS_CLIP), h)
                tl.store(trace_ptr + trace + local, h, mask=ok)
                tl.store(ckpt_ptr + ckpt + local, h, mask=ok & keep)
                w = tl.load(w_ptr + local, mask=ok & stepping, other=0.0).to(ACC)
                if ALPHA_SCALAR:
                    a = tl.load(alpha_ptr).to(ACC)
                else:
                    a = tl.load(alpha_ptr + local, mask=ok & stepping, other=0.0).to(ACC)
                p = _pre(x_ptr, y0_ptr, out_ptr, t, seq, B, IN, cols, col_ok & stepping, RECURRENT, HAS_Y0, ACC)
                z += tl.sum((w + a * h) * p[None, :], axis=1)
            row = (t * B + seq) * OUT + rows
            y = _post(z, x_ptr, bias_ptr, drive_ptr, row, rows, row_ok & stepping, RECURRENT, HAS_BIAS, HAS_DRIVE,
                      TANH, ACC)
            tl.store(out_ptr + row, y, mask=row_ok & stepping)
            if NARROW:
                tl.store(narrow_ptr + row, y, mask=row_ok & stepping)
        tl.debug_barrier()  # y_t, read back as the next pass's post and pre by other threads
        if ENDOGENOUS:
            s = _modulator_input(out_ptr, mw_ptr, mb_ptr, t, seq, B, OUT, stepping, HAS_MOD_BIAS, ACC, BLOCK_I)
            activity = _activity(s, MOD_TANH)
            tl.store(activity_ptr + (t * B + seq), activity, mask=stepping)


@triton.jit
def _trace_before(t, h_ptr, final_ptr, ckpt_ptr, seg_ptr, seq, local, ok, T, B, OUT, IN, EVERY,
                  RECOMPUTE: tl.constexpr, ACC: tl.constexpr):
    """What the reverse step t reads as its trace: H_t from the recomputed segment, or H_{t+1} to
    reconstruct H_t from: the forward's final trace (t = T - 1), a checkpoint (t + 1 a multiple of
    EVERY: the reconstruction restarts from an exact trace) or the previous reverse step's."""
    trace = seq * OUT * IN
    if RECOMPUTE:
        return tl.load(seg_ptr + ((t % EVERY) * B + seq) * OUT * IN + local, mask=ok, other=0.0).to(ACC)
    earlier = t < T - 1
    restart = earlier & ((t + 1) % EVERY == 0)
    ckpt = (((t + 1) // EVERY) * B + seq) * OUT * IN
    h = tl.load(final_ptr + trace + local, mask=ok & (t == T - 1), other=0.0).to(ACC)
    h += tl.load(ckpt_ptr + ckpt + local, mask=ok & restart, other=0.0).to(ACC)
    h += tl.load(h_ptr + trace + local, mask=ok & earlier & ((t + 1) % EVERY != 0), other=0.0).to(ACC)
    return h


@triton.jit
def _unupdate(h, p, y, eta, m, RULE: tl.constexpr):
    """H_t from H_{t+1} = rule(H_t) (no clip: clipped traces are recomputed, not reconstructed)."""
    if RULE == HEBB:
        return (h - eta * y[:, None] * p[None, :]) / (1.0 - eta)
    elif RULE == OJA:
        return (h - eta * y[:, None] * p[None, :]) / (1.0 - eta * y[:, None] * y[:, None])
    else:
        return h - m[:, None] * y[:, None] * p[None, :]


@triton.jit
def _grad_trace_after(t, g_ptr, ghebb_ptr, trace, local, ok, T, HAS_GHEBB: tl.constexpr, ACC: tl.constexpr):
    """dL/dH_{t+1}: the upstream gradient of the final trace at t = T - 1, else the previous reverse step's."""
    g = tl.load(g_ptr + trace + local, mask=ok & (t < T - 1), other=0.0).to(ACC)
    if HAS_GHEBB:
        g += tl.load(ghebb_ptr + trace + local, mask=ok & (t == T - 1), other=0.0).to(ACC)
    return g


@triton.jit
def _recompute_segment(t, x_ptr, y0_ptr, out_ptr, mod_ptr, activity_ptr, fanout_ptr, eta, bound, ckpt_ptr, seg_ptr,
                       seq, T, B, OUT, IN, EVERY,
                       RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr,
                       ENDOGENOUS: tl.constexpr, HAS_FANOUT: tl.constexpr, HAS_CLIP: tl.constexpr,
                       HAS_Y0: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """seg[u % EVERY] = H_u for u from t's checkpoint up to t, forward from the checkpoint."""
    start = (t // EVERY) * EVERY
    for u in range(start, t + 1):
        slot = ((u % EVERY) * B + seq) * OUT * IN
        prev = (((u - 1) % EVERY) * B + seq) * OUT * IN
        ckpt = ((u // EVERY) * B + seq) * OUT * IN
        first = u == start
        later = u > start
        activity = eta * 0.0
        if ENDOGENOUS:
            activity = tl.load(activity_ptr + ((u - 1) * B + seq), mask=later, other=0.0).to(ACC)
        for r0 in range(0, OUT, BLOCK_O):
            rows = r0 + tl.arange(0, BLOCK_O)
            row_ok = rows < OUT
            y = tl.load(out_ptr + ((u - 1) * B + seq) * OUT + rows, mask=row_ok & later, other=0.0).to(ACC)
            m = y
            if RULE == MODULATED:
                m = _modulation(mod_ptr, fanout_ptr, activity, u - 1, seq, B, OUT, rows, row_ok & later,
                                PER_NEURON, ENDOGENOUS, HAS_FANOUT, ACC)
            for c0 in range(0, IN, BLOCK_I):
                cols = c0 + tl.arange(0, BLOCK_I)
                col_ok = cols < IN
                ok = row_ok[:, None] & col_ok[None, :]
                local = rows[:, None] * IN + cols[None, :]
                h = tl.load(ckpt_ptr + ckpt + local, mask=ok & first,
                            other=0.0).to(ACC)
                h += tl.load(seg_ptr + prev + local, mask=ok & later, other=0.0).to(ACC)
                p = _pre(x_ptr, y0_ptr, out_ptr, u - 1, seq, B, IN, cols, col_ok & later, RECURRENT, HAS_Y0,
                         ACC)
                h = tl.where(first, h, _update(h, p, y, eta, m, bound, RULE, HAS_CLIP))
                tl.store(seg_ptr + slot + local, h, mask=ok)
        tl.debug_barrier()  # H_u, read back as the next slot's H_{u-1}


@triton.jit
def _backward_kernel(
    x_ptr, w_ptr, alpha_ptr, eta_ptr, y0_ptr, out_ptr, gout_ptr, mod_ptr, activity_ptr, mw_ptr, fanout_ptr,
    ckpt_ptr, final_ptr, ghebb_ptr, h_ptr, seg_ptr, g_ptr, gz_ptr, gpre_ptr, gmod_ptr, dm_ptr,
    galpha_ptr, geta_ptr, gmw_ptr, gmb_ptr, gfanout_ptr, gz_out_ptr, gpre_out_ptr, T, B, OUT, IN, clip: tl.float64,
    EVERY,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, ENDOGENOUS: tl.constexpr,
    MOD_TANH: tl.constexpr, HAS_MOD_BIAS: tl.constexpr, HAS_FANOUT: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_Y0: tl.constexpr, HAS_GOUT: tl.constexpr,
    HAS_GHEBB: tl.constexpr, RECOMPUTE: tl.constexpr, NARROW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # One sequence, steps t = T-1 .. 0. h_ptr: the reconstructed trace (H_{t+1} -> H_t); g_ptr:
    # dL/dH_{t+1} -> dL/dH_t (dL/dH_0 at the end: the hebb gradient). gpre_ptr: dL/dpre_t, which is
    # dL/dx_t (linear) or dL/dy_{t-1} (rnn: read back by step t-1's rows; dL/dy0 at the end).
    seq = tl.program_id(0).to(tl.int64)
    trace = seq * OUT * IN
    eta = tl.load(eta_ptr).to(ACC)
    bound = tl.full([], clip, ACC)  # exact: an fp64 argument, or a Python float in the interpreter
    zero = tl.zeros([1], dtype=ACC).sum(axis=0)
    geta = zero
    galpha = zero
    gmb = zero
    for k in range(T):
        t = T - 1 - k
        if RECOMPUTE:
            if (t == T - 1) | ((t + 1) % EVERY == 0):
                _recompute_segment(t, x_ptr, y0_ptr, out_ptr, mod_ptr, activity_ptr, fanout_ptr, eta, bound, ckpt_ptr,
                                   seg_ptr, seq, T, B, OUT, IN, EVERY, RECURRENT, RULE, PER_NEURON, ENDOGENOUS, HAS_FANOUT,
                                   HAS_CLIP, HAS_Y0, ACC, BLOCK_O, BLOCK_I)
        activity = zero
        if ENDOGENOUS:
            activity = tl.load(activity_ptr + (t * B + seq)).to(ACC)
        # Rows: H_t, the clip mask on dL/dH_{t+1}, the rule's share of dL/dy_t and dL/dM_t.
        dm_sum = zero
        for r0 in range(0, OUT, BLOCK_O):
            rows = r0 + tl.arange(0, BLOCK_O)
            row_ok = rows < OUT
            row = (t * B + seq) * OUT + rows
            y = tl.load(out_ptr + row, mask=row_ok, other=0.0).to(ACC)
            m = y
            if RULE == MODULATED:
                m = _modulation(mod_ptr, fanout_ptr, activity, t, seq, B, OUT, rows, row_ok, PER_NEURON, ENDOGENOUS, HAS_FANOUT,
                                ACC)
            dy = tl.zeros([BLOCK_O], dtype=ACC)
            dm = tl.zeros([BLOCK_O], dtype=ACC)
            for c0 in range(0, IN, BLOCK_I):
                cols = c0 + tl.arange(0, BLOCK_I)
                col_ok = cols < IN
                ok = row_ok[:, None] & col_ok[None, :]
                local = rows[:, None] * IN + cols[None, :]
                p = _pre(x_ptr, y0_ptr, out_ptr, t, seq, B, IN, cols, col_ok, RECURRENT, HAS_Y0, ACC)
                h = _trace_before(t, h_ptr, final_ptr, ckpt_ptr, seg_ptr, seq, local, ok, T, B, OUT, IN, EVERY,
                                  RECOMPUTE, ACC)
                if not RECOMPUTE:
                    h = _unupdate(h, p, y, eta, m, RULE)
                    tl.store(h_ptr + trace + local, h, mask=ok)
                g = _grad_trace_after(t, g_ptr, ghebb_ptr, trace, local, ok, T, HAS_GHEBB, ACC)
                g = _clip_mask(g, h, p, y, eta, m, bound, RULE, HAS_CLIP)
                pp = p[None, :]
                if RULE == HEBB:
                    dy += tl.sum(g * eta * pp, axis=1)
                elif RULE == OJA:
                    dy += tl.sum(g * eta * (pp - 2.0 * y[:, None] * h), axis=1)
                else:
                    dy += tl.sum(g * m[:, None] * pp, axis=1)
                    dm += tl.sum(g * y[:, None] * pp, axis=1)
            gy = dy
            if HAS_GOUT:
                gy += tl.load(gout_ptr + row, mask=row_ok, other=0.0).to(ACC)
            if RECURRENT:  # dL/dy_t through step t+1's pre
                gy += tl.load(gpre_ptr + seq * OUT + rows, mask=row_ok & (t < T - 1), other=0.0).to(ACC)
            if ENDOGENOUS:  # completed below, once dL/ds_t is known
                tl.store(gz_ptr + row, gy, mask=row_ok)
                tl.store(dm_ptr + seq * OUT + rows, dm, mask=row_ok)
                if HAS_FANOUT:
                    dm_sum += tl.sum(dm * tl.load(fanout_ptr + rows, mask=row_ok, other=0.0).to(ACC), axis=0)
                else:
                    dm_sum += tl.sum(tl.where(row_ok, dm, 0.0), axis=0)
            else:
                gz = gy * (1.0 - y * y) if TANH else gy
                tl.store(gz_ptr + row, gz, mask=row_ok)
                if NARROW:
                    tl.store(gz_out_ptr + row, gz, mask=row_ok)
                if RULE == MODULATED:
                    if PER_NEURON:
                        tl.store(gmod_ptr + row, dm, mask=row_ok)
                    else:
                        dm_sum += tl.sum(tl.where(row_ok, dm, 0.0), axis=0)
        if RULE == MODULATED and not PER_NEURON and not ENDOGENOUS:
            tl.store(gmod_ptr + (t * B + seq), dm_sum)
        tl.debug_barrier()  # this step's rows, read back below by other threads
        if ENDOGENOUS:
            # M_t = fanout * act(s_t), s_t = mod_weight . y_t + mod_bias: dL/ds_t, then its share of dL/dy_t.
            gs = dm_sum * (1.0 - activity * activity) if MOD_TANH else dm_sum
            gmb += gs
            for r0 in range(0, OUT, BLOCK_O):
                rows = r0 + tl.arange(0, BLOCK_O)
                row_ok = rows < OUT
                row = (t * B + seq) * OUT + rows
                y = tl.load(out_ptr + row, mask=row_ok, other=0.0).to(ACC)
                gy = tl.load(gz_ptr + row, mask=row_ok, other=0.0).to(ACC)
                gy += gs * tl.load(mw_ptr + rows, mask=row_ok, other=0.0).to(ACC)
                gz = gy * (1.0 - y * y) if TANH else gy
                tl.store(gz_ptr + row, gz, mask=row_ok)
                if NARROW:
                    tl.store(gz_out_ptr + row, gz, mask=row_ok)
                part = seq * OUT + rows
                gmw = tl.load(gmw_ptr + part, mask=row_ok & (t < T - 1), other=0.0)
                tl.store(gmw_ptr + part, gmw + gs * y, mask=row_ok)
                if HAS_FANOUT:
                    dm = tl.load(dm_ptr + part, mask=row_ok, other=0.0)
                    gfan = tl.load(gfanout_ptr + part, mask=row_ok & (t < T - 1), other=0.0)
                    tl.store(gfanout_ptr + part, gfan + dm * activity, mask=row_ok)
            tl.debug_barrier()
        # Columns: dL/dH_t, alpha, eta and dL/dpre_t, each column's sum over every row.
        for c0 in range(0, IN, BLOCK_I):
            cols = c0 + tl.arange(0, BLOCK_I)
            col_ok = cols < IN
            p = _pre(x_ptr, y0_ptr, out_ptr, t, seq, B, IN, cols, col_ok, RECURRENT, HAS_Y0, ACC)
            pp = p[None, :]
            gp = tl.zeros([BLOCK_I], dtype=ACC)
            for r0 in range(0, OUT, BLOCK_O):
                rows = r0 + tl.arange(0, BLOCK_O)
                row_ok = rows < OUT
                ok = row_ok[:, None] & col_ok[None, :]
                local = rows[:, None] * IN + cols[None, :]
                row = (t * B + seq) * OUT + rows
                y = tl.load(out_ptr + row, mask=row_ok, other=0.0).to(ACC)
                yy = y[:, None]
                m = y
                if RULE == MODULATED:
                    m = _modulation(mod_ptr, fanout_ptr, activity, t, seq, B, OUT, rows, row_ok, PER_NEURON,
                                    ENDOGENOUS, HAS_FANOUT, ACC)
                gz = tl.load(gz_ptr + row, mask=row_ok, other=0.0).to(ACC)
                if RECOMPUTE:
                    h = _trace_before(t, h_ptr, final_ptr, ckpt_ptr, seg_ptr, seq, local, ok, T, B, OUT, IN, EVERY,
                                      RECOMPUTE, ACC)
                else:
                    h = tl.load(h_ptr + trace + local, mask=ok, other=0.0).to(ACC)
                g = _grad_trace_after(t, g_ptr, ghebb_ptr, trace, local, ok, T, HAS_GHEBB, ACC)
                g = _clip_mask(g, h, p, y, eta, m, bound, RULE, HAS_CLIP)
                w = tl.load(w_ptr + local, mask=ok, other=0.0).to(ACC)
                hz = gz[:, None] * pp
                if ALPHA_SCALAR:
                    a = tl.load(alpha_ptr).to(ACC)
                    galpha += tl.sum(tl.sum(hz * h, axis=1), axis=0)
                else:
                    a = tl.load(alpha_ptr + local, mask=ok, other=0.0).to(ACC)
                    part = galpha_ptr + trace + local
                    tl.store(part, tl.load(part, mask=ok & (t < T - 1), other=0.0) + hz * h, mask=ok)
                if RULE == HEBB:
                    d_h = 1.0 - eta
                    d_p = eta * yy
                    geta += tl.sum(tl.sum(g * (yy * pp - h), axis=1), axis=0)
                elif RULE == OJA:
                    d_h = 1.0 - eta * yy * yy
                    d_p = eta * yy
                    geta += tl.sum(tl.sum(g * yy * (pp - yy * h), axis=1), axis=0)
                else:
                    d_h = 1.0
                    d_p = m[:, None] * yy
                gp += tl.sum((w + a * h) * gz[:, None] + g * d_p, axis=0)
                tl.store(g_ptr + trace + local, g * d_h + a * hz, mask=ok)
            if RECURRENT:
                tl.store(gpre_ptr + seq * IN + cols, gp, mask=col_ok)
                if NARROW:  # dL/dy0, complete at t = 0
                    tl.store(gpre_out_ptr + seq * IN + cols, gp, mask=col_ok & (t == 0))
            else:
                tl.store(gpre_ptr + (t * B + seq) * IN + cols, gp, mask=col_ok)
                if NARROW:
                    tl.store(gpre_out_ptr + (t * B + seq) * IN + cols, gp, mask=col_ok)
        tl.debug_barrier()  # dL/dH_t, H_t and dL/dy_{t-1}, read back by the next reverse step
    tl.store(geta_ptr + seq, geta)
    if ALPHA_SCALAR:
        tl.store(galpha_ptr + seq, galpha)
    if HAS_MOD_BIAS:
        tl.store(gmb_ptr + seq, gmb)


@triton.jit
def _sum_rows(src_ptr, dst_ptr, rows, width, offsets, ok, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """dst[offsets] = sum over r < rows of src[r, offsets] (src [rows, width]), in row order."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    src = src_ptr + offsets
    for _ in range(0, rows):
        acc += tl.load(src, mask=ok, other=0.0).to(ACC)
        src += width  # 64-bit pointer arithmetic: rows * width may pass 2^31
    tl.store(dst_ptr + offsets, acc, mask=ok)


@triton.jit
def _reduce_kernel(x_ptr, y0_ptr, out_ptr, gz_ptr, galpha_part_ptr, geta_part_ptr, gmw_part_ptr, gmb_part_ptr,
                   gfanout_part_ptr, gw_ptr, gbias_ptr, galpha_ptr, geta_ptr, gmw_ptr, gmb_ptr, gfanout_ptr,
                   T, B, OUT, IN,
                   RECURRENT: tl.constexpr, HAS_Y0: tl.constexpr, ALPHA_SCALAR: tl.constexpr,
                   ENDOGENOUS: tl.constexpr, HAS_MOD_BIAS: tl.constexpr, HAS_FANOUT: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (i, j) owns the [BLOCK_O, BLOCK_I] tile (i, j) of the weight gradient, the sum over
    # k = (t, b) of dL/dz_t[b] (x) pre_t[b], and of alpha's, the sum over b of its partial sums;
    # column tile 0 also the bias gradient (linear), program (0, 0) the scalars and the modulator's.
    # pre_t[b] is row k of x (linear), or of the output shifted by one step with y0 first (rnn).
    pid_o, pid_i = tl.program_id(0), tl.program_id(1)
    rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok, col_ok = rows < OUT, cols < IN
    ok = row_ok[:, None] & col_ok[None, :]
    local = rows[:, None] * IN + cols[None, :]
    steps = T * B
    gw = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    gb = tl.zeros([BLOCK_O], dtype=ACC)
    for k0 in range(0, steps, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < steps
        gz = tl.load(gz_ptr + ks[:, None] * OUT + rows[None, :], mask=k_ok[:, None] & row_ok[None, :],
                     other=0.0).to(ACC)
        pre_ok = k_ok[:, None] & col_ok[None, :]
        if RECURRENT:
            pre = tl.load(out_ptr + (ks[:, None] - B) * IN + cols[None, :], mask=pre_ok & (ks[:, None] >= B),
                          other=0.0).to(ACC)
            if HAS_Y0:
                pre += tl.load(y0_ptr + ks[:, None] * IN + cols[None, :], mask=pre_ok & (ks[:, None] < B),
                               other=0.0).to(ACC)
        else:
            pre = tl.load(x_ptr + ks[:, None] * IN + cols[None, :], mask=pre_ok, other=0.0).to(ACC)
        gw += tl.sum(gz[:, :, None] * pre[:, None, :], axis=0)
        gb += tl.sum(gz, axis=0)
    tl.store(gw_ptr + local, gw, mask=ok)
    if not RECURRENT:
        tl.store(gbias_ptr + rows, gb, mask=row_ok & (pid_i == 0))
    if not ALPHA_SCALAR:
        acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
        part = galpha_part_ptr + local
        for _ in range(0, B):
            acc += tl.load(part, mask=ok, other=0.0).to(ACC)
            part += OUT * IN  # 64-bit pointer arithmetic: B * OUT * IN may pass 2^31
        tl.store(galpha_ptr + local, acc, mask=ok)
    if (pid_o == 0) & (pid_i == 0):
        first = tl.arange(0, BLOCK_I)
        _sum_rows(geta_part_ptr, geta_ptr, B, 1, first, first < 1, ACC, BLOCK_I)
        if ALPHA_SCALAR:
            _sum_rows(galpha_part_ptr, galpha_ptr, B, 1, first, first < 1, ACC, BLOCK_I)
        if HAS_MOD_BIAS:
            _sum_rows(gmb_part_ptr, gmb_ptr, B, 1, first, first < 1, ACC, BLOCK_I)
        if ENDOGENOUS:
            for c0 in range(0, OUT, BLOCK_I):
                cols = c0 + first
                _sum_rows(gmw_part_ptr, gmw_ptr, B, OUT, cols, cols < OUT, ACC, BLOCK_I)
                if HAS_FANOUT:
                    _sum_rows(gfanout_part_ptr, gfanout_ptr, B, OUT, cols, cols < OUT, ACC, BLOCK_I)
