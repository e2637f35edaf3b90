"""Triton kernels for the plastic layers (SPEC section 4).

The kernels `_forward_sequence_kernel`, `_forward_step_kernel` and `_backward_step_kernel`;
their launcher is ``neuronml_fast/ops/plastic/triton.py`` (behind the time loops of
``neuronml_fast/ops/plastic/gpu.py``), beside the reference, the custom op and the other
backends' launchers. Same algorithm and memory contract as the C++ CPU backend
(csrc/cpu/plastic.cpp).

* Small layers (N <= 128, no clip, a tile of at most 64 KiB: N <= 64 in float64): one launch
  per sequence batch. Each program owns one sequence and keeps its whole trace, weight and alpha
  in registers for all T steps.
* Larger layers: one launch per step over (sequence, block of rows); a row's pre-activation and
  its trace update happen in the same program, one pass over the trace. Launches are queued
  back to back: no host synchronization per step.
* Backward: one launch per step, in reverse, reconstructing each trace from the next (exact
  checkpoints bound the rounding growth, see `checkpoint_every` in neuronml_fast/ops/plastic/op.py); under clip the
  segments are recomputed forward from their checkpoints.
* Offsets: across sequences and steps in 64 bits (a trace or checkpoint buffer of B x OUT x IN,
  an output of T x B x OUT, passes 2^31 elements long before memory runs out); within one
  sequence's [OUT, IN] matrix in 32 bits, which the launchers guarantee (`MAX_MATRIX`).
* The step index ``t`` is not specialized: a specialization per value class (t = 1, t divisible
  by 16, other) would compile every step kernel three times.
"""

import triton
import triton.language as tl

from ..ops.plastic import rules

# The rule codes (neuronml_fast/ops/plastic/rules.py), as compile-time constants of the kernels.
HEBB: tl.constexpr = tl.constexpr(rules.HEBB)
OJA: tl.constexpr = tl.constexpr(rules.OJA)
MODULATED: tl.constexpr = tl.constexpr(rules.MODULATED)

SEQUENCE_KERNEL_MAX_N = 128
# One [OUT, IN] tile of the sequence kernel; it holds three (weight, alpha, trace) in registers,
# which at 128 x 128 float32 nearly fill a register file (float64 at that size spills kilobytes).
SEQUENCE_KERNEL_MAX_TILE_BYTES = 128 * 128 * 4
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
def _modulation(mod_ptr, t, seq, B, OUT, rows, ok, PER_NEURON: tl.constexpr, ACC: tl.constexpr):
    """M of step t for sequence seq (int64), per row or one scalar broadcast to the rows."""
    if PER_NEURON:
        return tl.load(mod_ptr + (t * B + seq) * OUT + rows, mask=ok, other=0.0).to(ACC)
    return tl.zeros_like(rows).to(ACC) + tl.load(mod_ptr + (t * B + seq)).to(ACC)


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
def _forward_sequence_kernel(
    x_ptr, w_ptr, alpha_ptr, eta_ptr, bias_ptr, drive_ptr, y0_ptr, mod_ptr, hebb_ptr, out_ptr, ckpt_ptr,
    T, B, OUT, IN, clip_ptr, EVERY,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRIVE: tl.constexpr,
    HAS_Y0: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
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
    clip = tl.load(clip_ptr).to(ACC)  # a tensor: a Python float would arrive as float32
    trace = seq * OUT * IN
    h = tl.load(hebb_ptr + trace + tile, mask=tile_ok, other=0.0).to(ACC)
    if RECURRENT:
        if HAS_Y0:
            p = tl.load(y0_ptr + seq * IN + cols, mask=col_ok, other=0.0).to(ACC)
        else:
            p = tl.zeros([BLOCK_I], dtype=ACC)
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
        m = y
        if RULE == MODULATED:
            m = _modulation(mod_ptr, t, seq, B, OUT, rows, row_ok, PER_NEURON, ACC)
        h = tl.where(tile_ok, _update(h, p, y, eta, m, clip, RULE, HAS_CLIP), 0.0)
        if RECURRENT:
            p = tl.reshape(y, [BLOCK_I])  # this step's post is the next step's pre
    tl.store(hebb_ptr + trace + tile, h, mask=tile_ok)


@triton.jit(do_not_specialize=["t"])
def _forward_step_kernel(
    x_ptr, w_ptr, alpha_ptr, eta_ptr, bias_ptr, drive_ptr, pre_ptr, mod_ptr, hebb_ptr, out_ptr,
    t, B, OUT, IN, clip_ptr,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRIVE: tl.constexpr,
    UPDATE_ONLY: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # One step for a block of rows of one sequence: z, y, then the rows' trace update. With
    # UPDATE_ONLY the post activity is read from out_ptr (recomputing a clip segment).
    seq, pid = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < OUT
    trace = seq * OUT * IN
    eta = tl.load(eta_ptr).to(ACC)
    clip = tl.load(clip_ptr).to(ACC)
    row = (t * B + seq) * OUT + rows
    if UPDATE_ONLY:
        y = tl.load(out_ptr + row, mask=row_ok, other=0.0).to(ACC)
    else:
        z = tl.zeros([BLOCK_O], dtype=ACC)
        for c0 in range(0, IN, BLOCK_I):
            cols = c0 + tl.arange(0, BLOCK_I)
            col_ok = cols < IN
            ok = row_ok[:, None] & col_ok[None, :]
            tile = rows[:, None] * IN + cols[None, :]
            w = tl.load(w_ptr + tile, mask=ok, other=0.0).to(ACC)
            a = tl.load(alpha_ptr).to(ACC) if ALPHA_SCALAR else tl.load(alpha_ptr + tile, mask=ok, other=0.0).to(ACC)
            h = tl.load(hebb_ptr + trace + tile, mask=ok, other=0.0).to(ACC)
            p = tl.load(pre_ptr + seq * IN + cols, mask=col_ok, other=0.0).to(ACC)
            z += tl.sum((w + a * h) * p[None, :], axis=1)
        y = _post(z, x_ptr, bias_ptr, drive_ptr, row, rows, row_ok, RECURRENT, HAS_BIAS, HAS_DRIVE, TANH, ACC)
        tl.store(out_ptr + row, y, mask=row_ok)
    m = y
    if RULE == MODULATED:
        m = _modulation(mod_ptr, t, seq, B, OUT, rows, row_ok, PER_NEURON, ACC)
    for c0 in range(0, IN, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        col_ok = cols < IN
        ok = row_ok[:, None] & col_ok[None, :]
        tile = rows[:, None] * IN + cols[None, :]
        h = tl.load(hebb_ptr + trace + tile, mask=ok, other=0.0).to(ACC)
        p = tl.load(pre_ptr + seq * IN + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(hebb_ptr + trace + tile, _update(h, p, y, eta, m, clip, RULE, HAS_CLIP), mask=ok)


@triton.jit(do_not_specialize=["t"])
def _backward_step_kernel(
    w_ptr, alpha_ptr, eta_ptr, pre_ptr, out_ptr, gout_ptr, carry_ptr, mod_ptr, hebb_ptr, ghebb_ptr,
    gz_ptr, gpre_part_ptr, galpha_part_ptr, geta_part_ptr, gmod_part_ptr,
    t, B, OUT, IN, clip_ptr,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, RECONSTRUCT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Step t in reverse for a block of rows of one sequence. hebb holds H_{t+1} (RECONSTRUCT) or
    # H_t (recomputed: clip or identity activation) and leaves holding H_t; ghebb holds
    # dL/dH_{t+1} -> dL/dH_t. Partial sums go to buffers owned by this program: deterministic, no
    # atomics.
    seq, pid = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_blocks = tl.num_programs(1)
    rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < OUT
    trace = seq * OUT * IN
    eta = tl.load(eta_ptr).to(ACC)
    clip = tl.load(clip_ptr).to(ACC)
    row = (t * B + seq) * OUT + rows
    y = tl.load(out_ptr + row, mask=row_ok, other=0.0).to(ACC)
    m = y * 0.0
    if RULE == MODULATED:
        m = _modulation(mod_ptr, t, seq, B, OUT, rows, row_ok, PER_NEURON, ACC)
    # First pass: H_t, the clip mask on dL/dH', the rule's share of dL/dy (and dL/dM).
    dy = tl.zeros([BLOCK_O], dtype=ACC)
    dm = tl.zeros([BLOCK_O], dtype=ACC)
    for c0 in range(0, IN, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        col_ok = cols < IN
        ok = row_ok[:, None] & col_ok[None, :]
        tile = trace + rows[:, None] * IN + cols[None, :]
        h = tl.load(hebb_ptr + tile, mask=ok, other=0.0).to(ACC)
        p = tl.load(pre_ptr + seq * IN + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        g = tl.load(ghebb_ptr + tile, mask=ok, other=0.0).to(ACC)
        yy = y[:, None]
        if RECONSTRUCT:
            if RULE == HEBB:
                h = (h - eta * yy * p) / (1.0 - eta)
            elif RULE == OJA:
                h = (h - eta * yy * p) / (1.0 - eta * yy * yy)
            else:
                h = h - m[:, None] * yy * p
            tl.store(hebb_ptr + tile, h, mask=ok)
        if HAS_CLIP:
            nxt = _update(h, tl.reshape(p, [BLOCK_I]), y, eta, m, clip, RULE, False)
            g = tl.where((nxt < -clip) | (nxt > clip), 0.0, g)
            tl.store(ghebb_ptr + tile, g, mask=ok)
        if RULE == HEBB:
            dy += tl.sum(g * eta * p, axis=1)
        elif RULE == OJA:
            dy += tl.sum(g * eta * (p - 2.0 * yy * h), axis=1)
        else:
            dy += tl.sum(g * m[:, None] * p, axis=1)
            dm += tl.sum(g * yy * p, axis=1)
    gy = tl.load(gout_ptr + row, mask=row_ok, other=0.0).to(ACC) + dy
    if RECURRENT:
        gy += tl.load(carry_ptr + seq * OUT + rows, mask=row_ok, other=0.0).to(ACC)
    gz = gy * (1.0 - y * y) if TANH else gy
    gz = tl.where(row_ok, gz, 0.0)
    tl.store(gz_ptr + row, gz, mask=row_ok)
    if RULE == MODULATED:
        tl.store(gmod_part_ptr + seq * OUT + rows, dm, mask=row_ok)
    # Second pass: dL/dH_t, alpha, eta and the presynaptic gradient.
    geta = tl.zeros([BLOCK_O], dtype=ACC)
    ga_scalar = tl.zeros([BLOCK_O], dtype=ACC)
    for c0 in range(0, IN, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        col_ok = cols < IN
        ok = row_ok[:, None] & col_ok[None, :]
        local = rows[:, None] * IN + cols[None, :]
        tile = trace + local
        h = tl.load(hebb_ptr + tile, mask=ok, other=0.0).to(ACC)
        g = tl.load(ghebb_ptr + tile, mask=ok, other=0.0).to(ACC)
        p = tl.load(pre_ptr + seq * IN + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        w = tl.load(w_ptr + local, mask=ok, other=0.0).to(ACC)
        a = tl.load(alpha_ptr).to(ACC) if ALPHA_SCALAR else tl.load(alpha_ptr + local, mask=ok, other=0.0).to(ACC)
        yy = y[:, None]
        hz = gz[:, None] * p
        if ALPHA_SCALAR:
            ga_scalar += tl.sum(hz * h, axis=1)
        else:
            part = galpha_part_ptr + tile
            tl.store(part, tl.load(part, mask=ok, other=0.0) + hz * h, mask=ok)
        if RULE == HEBB:
            d_h = 1.0 - eta
            d_p = eta * yy
            geta += tl.sum(g * (yy * p - h), axis=1)
        elif RULE == OJA:
            d_h = 1.0 - eta * yy * yy
            d_p = eta * yy
            geta += tl.sum(g * yy * (p - yy * h), axis=1)
        else:
            d_h = 1.0
            d_p = m[:, None] * yy
        gp = tl.sum((w + a * h) * gz[:, None] + g * d_p, axis=0)
        tl.store(gpre_part_ptr + (pid * B + seq) * IN + cols, gp, mask=col_ok)
        tl.store(ghebb_ptr + tile, g * d_h + a * hz, mask=ok)
    slot = seq * n_blocks + pid
    tl.store(geta_part_ptr + slot, tl.load(geta_part_ptr + slot) + tl.sum(geta, axis=0))
    if ALPHA_SCALAR:
        tl.store(galpha_part_ptr + slot, tl.load(galpha_part_ptr + slot) + tl.sum(ga_scalar, axis=0))
