"""Triton kernels for the plastic layers (SPEC section 4).

kernels (`_forward_sequence_kernel`, `_forward_step_kernel`, `_backward_step_kernel`) ->
launchers (`plastic_forward`, `plastic_backward`). Same algorithm and memory contract as the
C++ CPU backend (csrc/cpu/plastic.cpp); the reference, custom op and autograd live in
``neuronml_fast/ops/plastic.py``.

* Small layers (N <= 128, no clip): one launch per sequence batch. Each program owns one
  sequence and keeps its whole trace, weight and alpha in registers for all T steps.
* Larger layers: one launch per step over (sequence, block of rows); a row's pre-activation and
  its trace update happen in the same program, one pass over the trace. Launches are queued
  back to back: no host synchronization per step.
* Backward: one launch per step, in reverse, reconstructing each trace from the next (exact
  checkpoints bound the rounding growth, see neuronml_fast/cpu/plastic.py); under clip the
  segments are recomputed forward from their checkpoints.
"""

import torch
import triton
import triton.language as tl

from neuronml_fast import _alloc

from ._common import accumulation_tl_dtype

HEBB, OJA, MODULATED = 0, 1, 2
_RULES = {"hebb": HEBB, "oja": OJA}
SEQUENCE_KERNEL_MAX_N = 128


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): exact limits at +-inf, no libdevice needed (works in the interpreter).
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _update(h, p, y, eta, m, clip, RULE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """H' = rule(H) for a tile: h [rows, cols], p [cols] (pre), y [rows] (post), m [rows]."""
    if RULE == 0:
        h = (1.0 - eta) * h + eta * y[:, None] * p[None, :]
    elif RULE == 1:
        h = h + eta * y[:, None] * (p[None, :] - y[:, None] * h)
    else:
        h = h + m[:, None] * y[:, None] * p[None, :]
    if HAS_CLIP:
        h = tl.minimum(tl.maximum(h, -clip), clip)
    return h


@triton.jit
def _modulation(mod_ptr, t, b, B, OUT, rows, ok, PER_NEURON: tl.constexpr, ACC: tl.constexpr):
    if PER_NEURON:
        return tl.load(mod_ptr + (t * B + b) * OUT + rows, mask=ok, other=0.0).to(ACC)
    return tl.zeros_like(rows).to(ACC) + tl.load(mod_ptr + t * B + b).to(ACC)


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
    b = tl.program_id(0)
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
    trace = b.to(tl.int64) * OUT * IN
    h = tl.load(hebb_ptr + trace + tile, mask=tile_ok, other=0.0).to(ACC)
    if RECURRENT:
        if HAS_Y0:
            p = tl.load(y0_ptr + b * IN + cols, mask=col_ok, other=0.0).to(ACC)
        else:
            p = tl.zeros([BLOCK_I], dtype=ACC)
    for t in range(T):
        if t % EVERY == 0:
            tl.store(ckpt_ptr + (t // EVERY) * B * OUT * IN + trace + tile, h, mask=tile_ok)
        row = (t * B + b) * OUT + rows
        if not RECURRENT:
            p = tl.load(x_ptr + (t * B + b) * IN + cols, mask=col_ok, other=0.0).to(ACC)
        z = tl.sum((w + a * h) * p[None, :], axis=1)
        y = _post(z, x_ptr, bias_ptr, drive_ptr, row, rows, row_ok, RECURRENT, HAS_BIAS, HAS_DRIVE, TANH, ACC)
        y = tl.where(row_ok, y, 0.0)
        tl.store(out_ptr + row, y, mask=row_ok)
        m = y
        if RULE == 2:
            m = _modulation(mod_ptr, t, b, B, OUT, rows, row_ok, PER_NEURON, ACC)
        h = tl.where(tile_ok, _update(h, p, y, eta, m, clip, RULE, HAS_CLIP), 0.0)
        if RECURRENT:
            p = tl.reshape(y, [BLOCK_I])  # this step's post is the next step's pre
    tl.store(hebb_ptr + trace + tile, h, mask=tile_ok)


@triton.jit
def _forward_step_kernel(
    x_ptr, w_ptr, alpha_ptr, eta_ptr, bias_ptr, drive_ptr, pre_ptr, mod_ptr, hebb_ptr, out_ptr,
    t, B, OUT, IN, clip_ptr,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRIVE: tl.constexpr,
    UPDATE_ONLY: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # One step for a block of rows of one sequence: z, y, then the rows' trace update. With
    # UPDATE_ONLY the post activity is read from out_ptr (recomputing a clip segment).
    b, pid = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < OUT
    trace = b.to(tl.int64) * OUT * IN
    eta = tl.load(eta_ptr).to(ACC)
    clip = tl.load(clip_ptr).to(ACC)
    row = (t * B + b) * OUT + rows
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
            p = tl.load(pre_ptr + b * IN + cols, mask=col_ok, other=0.0).to(ACC)
            z += tl.sum((w + a * h) * p[None, :], axis=1)
        y = _post(z, x_ptr, bias_ptr, drive_ptr, row, rows, row_ok, RECURRENT, HAS_BIAS, HAS_DRIVE, TANH, ACC)
        tl.store(out_ptr + row, y, mask=row_ok)
    m = y
    if RULE == 2:
        m = _modulation(mod_ptr, t, b, B, OUT, rows, row_ok, PER_NEURON, ACC)
    for c0 in range(0, IN, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        col_ok = cols < IN
        ok = row_ok[:, None] & col_ok[None, :]
        tile = rows[:, None] * IN + cols[None, :]
        h = tl.load(hebb_ptr + trace + tile, mask=ok, other=0.0).to(ACC)
        p = tl.load(pre_ptr + b * IN + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(hebb_ptr + trace + tile, _update(h, p, y, eta, m, clip, RULE, HAS_CLIP), mask=ok)


@triton.jit
def _backward_step_kernel(
    w_ptr, alpha_ptr, eta_ptr, pre_ptr, out_ptr, gout_ptr, carry_ptr, mod_ptr, hebb_ptr, ghebb_ptr,
    gz_ptr, gpre_part_ptr, galpha_part_ptr, geta_part_ptr, gmod_part_ptr,
    t, B, OUT, IN, clip_ptr,
    RECURRENT: tl.constexpr, RULE: tl.constexpr, PER_NEURON: tl.constexpr, TANH: tl.constexpr,
    ALPHA_SCALAR: tl.constexpr, HAS_CLIP: tl.constexpr, RECONSTRUCT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Step t in reverse for a block of rows of one sequence. hebb holds H_{t+1} (RECONSTRUCT) or
    # H_t (clip: recomputed) and leaves holding H_t; ghebb holds dL/dH_{t+1} -> dL/dH_t. Partial
    # sums go to buffers owned by this program: deterministic, no atomics.
    b, pid = tl.program_id(0), tl.program_id(1)
    n_blocks = tl.num_programs(1)
    rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < OUT
    trace = b.to(tl.int64) * OUT * IN
    eta = tl.load(eta_ptr).to(ACC)
    clip = tl.load(clip_ptr).to(ACC)
    row = (t * B + b) * OUT + rows
    y = tl.load(out_ptr + row, mask=row_ok, other=0.0).to(ACC)
    m = y * 0.0
    if RULE == 2:
        m = _modulation(mod_ptr, t, b, B, OUT, rows, row_ok, PER_NEURON, ACC)
    # First pass: H_t, the clip mask on dL/dH', the rule's share of dL/dy (and dL/dM).
    dy = tl.zeros([BLOCK_O], dtype=ACC)
    dm = tl.zeros([BLOCK_O], dtype=ACC)
    for c0 in range(0, IN, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        col_ok = cols < IN
        ok = row_ok[:, None] & col_ok[None, :]
        tile = trace + rows[:, None] * IN + cols[None, :]
        h = tl.load(hebb_ptr + tile, mask=ok, other=0.0).to(ACC)
        p = tl.load(pre_ptr + b * IN + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        g = tl.load(ghebb_ptr + tile, mask=ok, other=0.0).to(ACC)
        yy = y[:, None]
        if RECONSTRUCT:
            if RULE == 0:
                h = (h - eta * yy * p) / (1.0 - eta)
            elif RULE == 1:
                h = (h - eta * yy * p) / (1.0 - eta * yy * yy)
            else:
                h = h - m[:, None] * yy * p
            tl.store(hebb_ptr + tile, h, mask=ok)
        if HAS_CLIP:
            nxt = _update(h, tl.reshape(p, [BLOCK_I]), y, eta, m, clip, RULE, False)
            g = tl.where((nxt < -clip) | (nxt > clip), 0.0, g)
            tl.store(ghebb_ptr + tile, g, mask=ok)
        if RULE == 0:
            dy += tl.sum(g * eta * p, axis=1)
        elif RULE == 1:
            dy += tl.sum(g * eta * (p - 2.0 * yy * h), axis=1)
        else:
            dy += tl.sum(g * m[:, None] * p, axis=1)
            dm += tl.sum(g * yy * p, axis=1)
    gy = tl.load(gout_ptr + row, mask=row_ok, other=0.0).to(ACC) + dy
    if RECURRENT:
        gy += tl.load(carry_ptr + b * OUT + rows, mask=row_ok, other=0.0).to(ACC)
    gz = gy * (1.0 - y * y) if TANH else gy
    gz = tl.where(row_ok, gz, 0.0)
    tl.store(gz_ptr + row, gz, mask=row_ok)
    if RULE == 2:
        tl.store(gmod_part_ptr + b * OUT + rows, dm, mask=row_ok)
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
        p = tl.load(pre_ptr + b * IN + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        w = tl.load(w_ptr + local, mask=ok, other=0.0).to(ACC)
        a = tl.load(alpha_ptr).to(ACC) if ALPHA_SCALAR else tl.load(alpha_ptr + local, mask=ok, other=0.0).to(ACC)
        yy = y[:, None]
        hz = gz[:, None] * p
        if ALPHA_SCALAR:
            ga_scalar += tl.sum(hz * h, axis=1)
        else:
            part = galpha_part_ptr + tile
            tl.store(part, tl.load(part, mask=ok, other=0.0) + hz * h, mask=ok)
        if RULE == 0:
            d_h = 1.0 - eta
            d_p = eta * yy
            geta += tl.sum(g * (yy * p - h), axis=1)
        elif RULE == 1:
            d_h = 1.0 - eta * yy * yy
            d_p = eta * yy
            geta += tl.sum(g * yy * (p - yy * h), axis=1)
        else:
            d_h = 1.0
            d_p = m[:, None] * yy
        gp = tl.sum((w + a * h) * gz[:, None] + g * d_p, axis=0)
        tl.store(gpre_part_ptr + (pid * B + b) * IN + cols, gp, mask=col_ok)
        tl.store(ghebb_ptr + tile, g * d_h + a * hz, mask=ok)
    slot = b * n_blocks + pid
    tl.store(geta_part_ptr + slot, tl.load(geta_part_ptr + slot) + tl.sum(geta, axis=0))
    if ALPHA_SCALAR:
        tl.store(galpha_part_ptr + slot, tl.load(galpha_part_ptr + slot) + tl.sum(ga_scalar, axis=0))


# ---- launchers -------------------------------------------------------------------------------


def _flags(x, alpha, modulation, clip, recurrent, rule, activation):
    return dict(RECURRENT=recurrent, RULE=MODULATED if modulation is not None else _RULES[rule],
                PER_NEURON=modulation is not None and modulation.dim() == 3, TANH=activation == "tanh",
                ALPHA_SCALAR=alpha.dim() == 0, HAS_CLIP=clip is not None, ACC=accumulation_tl_dtype(x.dtype))


def _blocks(out_features, in_features):
    return min(32, triton.next_power_of_2(max(out_features, 1))), min(64, triton.next_power_of_2(max(in_features, 1)))


def _pre(x, y0, output, t, recurrent):
    if not recurrent:
        return x[t]
    if t > 0:
        return output[t - 1]
    return y0 if y0 is not None else x.new_zeros(x.shape[1:])


def _c(t):
    return None if t is None else t.contiguous()


def plastic_forward(x, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
                    every):
    x, weight, alpha, eta, bias, drive, y0, modulation = map(_c, (x, weight, alpha, eta, bias, drive, y0, modulation))
    T, B = x.shape[:2]
    out_features, in_features = weight.shape
    new = lambda *shape: _alloc.empty(shape, dtype=x.dtype, device=x.device)  # noqa: E731
    trace = new(B, out_features, in_features)
    trace.copy_(hebb) if hebb is not None else trace.zero_()
    output = new(T, B, out_features)
    checkpoints = new(-(-T // every), B, out_features, in_features)
    if T == 0 or B == 0:
        return output, trace, checkpoints
    flags = _flags(x, alpha, modulation, clip, recurrent, rule, activation)
    dummy = x
    common = (alpha, eta, bias if bias is not None else dummy, drive if drive is not None else dummy)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    clip_value = torch.tensor([float(clip) if clip is not None else 0.0], dtype=acc, device=x.device)
    if max(out_features, in_features) <= SEQUENCE_KERNEL_MAX_N and clip is None:  # (clip: per-step kernel)
        block_o, block_i = triton.next_power_of_2(out_features), triton.next_power_of_2(in_features)
        if recurrent:
            block_o = block_i = max(block_o, block_i)
        _forward_sequence_kernel[(B,)](
            x, weight, *common, y0 if y0 is not None else dummy, modulation if modulation is not None else dummy,
            trace, output, checkpoints, T, B, out_features, in_features, clip_value, every,
            HAS_BIAS=bias is not None, HAS_DRIVE=drive is not None, HAS_Y0=y0 is not None,
            BLOCK_O=block_o, BLOCK_I=block_i, **flags)
        return output, trace, checkpoints
    block_o, block_i = _blocks(out_features, in_features)
    grid = (B, triton.cdiv(out_features, block_o))
    for t in range(T):
        if t % every == 0:
            checkpoints[t // every].copy_(trace)
        _forward_step_kernel[grid](
            x, weight, *common, _pre(x, y0, output, t, recurrent).contiguous(),
            modulation if modulation is not None else dummy, trace, output, t, B, out_features, in_features,
            clip_value, HAS_BIAS=bias is not None, HAS_DRIVE=drive is not None, UPDATE_ONLY=False,
            BLOCK_O=block_o, BLOCK_I=block_i, **flags)
    return output, trace, checkpoints


def plastic_backward(grad_output, grad_hebb, x, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints,
                     clip, recurrent, rule, activation, every):
    x, weight, alpha, eta, y0, modulation, output, grad_output = map(
        _c, (x, weight, alpha, eta, y0, modulation, output, grad_output))
    T, B = x.shape[:2]
    out_features, in_features = weight.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flags = _flags(x, alpha, modulation, clip, recurrent, rule, activation)
    block_o, block_i = _blocks(out_features, in_features)
    blocks = triton.cdiv(out_features, block_o)
    trace = hebb_final.detach().to(acc).clone()
    grad_trace = (torch.zeros_like(trace) if grad_hebb is None else grad_hebb.detach().to(acc).clone()).contiguous()
    grad_z = _alloc.empty((T, B, out_features), dtype=acc, device=x.device)
    grad_pre = None if recurrent else _alloc.empty((T, B, in_features), dtype=acc, device=x.device)
    gpre_part = _alloc.empty((blocks, B, in_features), dtype=acc, device=x.device)
    galpha_part = torch.zeros((B * blocks,) if alpha.dim() == 0 else (B, out_features, in_features), dtype=acc,
                              device=x.device)
    geta_part = torch.zeros(B * blocks, dtype=acc, device=x.device)
    gmod_rows = torch.zeros((B, out_features), dtype=acc, device=x.device)
    grad_mod = None if modulation is None else torch.zeros(modulation.shape, dtype=acc, device=x.device)
    carry = torch.zeros((B, out_features), dtype=acc, device=x.device)
    recompute = clip is not None or activation == "identity"  # see neuronml_fast.cpu.plastic.recomputes
    segment, segment_start = None, None
    clip_value = torch.tensor([float(clip) if clip is not None else 0.0], dtype=acc, device=x.device)
    dummy = x
    for t in range(T - 1, -1, -1):
        if recompute and (segment_start is None or t < segment_start):
            segment_start = (t // every) * every
            segment = [checkpoints[t // every].to(acc).clone()]
            for u in range(segment_start, t):
                nxt = segment[-1].clone()
                _forward_step_kernel[(B, blocks)](
                    x, weight, alpha, eta, dummy, dummy, _pre(x, y0, output, u, recurrent).contiguous(),
                    modulation if modulation is not None else dummy, nxt, output, u, B, out_features, in_features,
                    clip_value, HAS_BIAS=False, HAS_DRIVE=False, UPDATE_ONLY=True, BLOCK_O=block_o,
                    BLOCK_I=block_i, **flags)
                segment.append(nxt)
        if not recompute and (t + 1) % every == 0 and t + 1 < T:
            trace.copy_(checkpoints[(t + 1) // every])  # restart the reconstruction from an exact trace
        h = segment[t - segment_start] if recompute else trace
        _backward_step_kernel[(B, blocks)](
            weight, alpha, eta, _pre(x, y0, output, t, recurrent).to(acc).contiguous(), output, grad_output, carry,
            modulation if modulation is not None else dummy, h, grad_trace, grad_z, gpre_part, galpha_part,
            geta_part, gmod_rows, t, B, out_features, in_features, clip_value, RECONSTRUCT=not recompute,
            BLOCK_O=block_o, BLOCK_I=block_i, **flags)
        gp = gpre_part.sum(0)
        if recurrent:
            carry = gp
        else:
            grad_pre[t] = gp
        if grad_mod is not None:
            grad_mod[t] = gmod_rows if modulation.dim() == 3 else gmod_rows.sum(1)
    if recurrent:
        pre = torch.cat([(y0 if y0 is not None else x.new_zeros((B, out_features))).unsqueeze(0), output[:-1]]) \
            if T else x.new_zeros((0, B, in_features))
        grad_input, grad_y0 = grad_z, carry
    else:
        pre, grad_input, grad_y0 = x, grad_pre, None
    grad_weight = torch.einsum("tbo,tbi->oi", grad_z, pre.to(acc))
    grad_alpha = galpha_part.sum() if alpha.dim() == 0 else galpha_part.sum(0)
    cast = lambda g: None if g is None else g.to(x.dtype)  # noqa: E731
    grad_drive = None if recurrent else grad_z
    return (cast(grad_input), cast(grad_weight), cast(grad_alpha).view(alpha.shape), cast(geta_part.sum()),
            cast(grad_trace), cast(grad_z.sum((0, 1))), cast(grad_drive), cast(grad_y0), cast(grad_mod))
