"""The time loops of the GPU plastic backends (Triton and CUDA C++), written once.

A backend passes its step kernels as the `steps` argument, an object with `rows_per_block`,
`forward_step` (over sequence x block of rows), `sequence_forward` (the whole sequence in one
launch, or False where it does not apply) and `backward_step` (the reverse step):
`triton.TritonSteps`, `cuda.CudaSteps` (duck-typed: no common base class). This module owns
everything around them: buffers, checkpoints, the restart of the trace reconstruction from exact
checkpoints, the forward recomputation of segments (clip, identity activation) and the reductions
of per-program partial sums. Same algorithm as the C++ CPU backend (csrc/cpu/plastic_kernels.inc).
No host synchronization inside the loops.

Partial-sum contract of a reverse step, ``blocks = ceil(OUT / rows_per_block)``:
``gpre_part [blocks, B, IN]`` (written), ``galpha_part [B, OUT, IN]`` or ``[B * blocks]`` for a
scalar alpha (accumulated), ``geta_part [B * blocks]`` (accumulated), ``gmod_rows [B, OUT]``
(written, modulated rule only), ``grad_z [T, B, OUT]`` (row t written).
"""

import dataclasses
from typing import Optional

import torch

from ... import _alloc
from .op import dense_grads, modulator_grads, recomputes
from .rules import MODULATED, RULE_CODES


@dataclasses.dataclass
class PlasticCall:
    """One plastic call's tensors (contiguous) and options, as the step kernels take them."""

    x: torch.Tensor
    weight: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    bias: Optional[torch.Tensor]
    drive: Optional[torch.Tensor]
    y0: Optional[torch.Tensor]
    modulation: Optional[torch.Tensor]
    clip: torch.Tensor  # [1] in the accumulation dtype (0 when unused)
    recurrent: bool
    rule: int
    per_neuron: bool
    tanh: bool
    alpha_scalar: bool
    has_clip: bool
    output: Optional[torch.Tensor] = None
    grad_output: Optional[torch.Tensor] = None

    T = property(lambda self: self.x.shape[0])  # steps
    B = property(lambda self: self.x.shape[1])  # sequences
    out_features = property(lambda self: self.weight.shape[0])
    in_features = property(lambda self: self.weight.shape[1])

    @property
    def acc(self):
        return _alloc.accumulation_dtype(self.x.dtype)

    def pre(self, t):
        """Presynaptic activity of step t: x_t, or y_{t-1} (y0 or zeros at t = 0)."""
        if not self.recurrent:
            return self.x[t]
        if t > 0:
            return self.output[t - 1]
        return self.y0 if self.y0 is not None else self.x.new_zeros(self.x.shape[1:])


def _contiguous(t):
    return None if t is None else t.contiguous()


def _plastic_call(x, weight, alpha, eta, bias, drive, y0, modulation, clip, recurrent, rule, activation):
    acc = _alloc.accumulation_dtype(x.dtype)
    c = _contiguous
    return PlasticCall(
        x=c(x), weight=c(weight), alpha=c(alpha), eta=c(eta), bias=c(bias), drive=c(drive), y0=c(y0),
        modulation=c(modulation),
        clip=torch.tensor([float(clip) if clip is not None else 0.0], dtype=acc, device=x.device),
        recurrent=recurrent, rule=MODULATED if modulation is not None else RULE_CODES[rule],
        per_neuron=modulation is not None and modulation.dim() == 3, tanh=activation == "tanh",
        alpha_scalar=alpha.dim() == 0, has_clip=clip is not None)


def forward(steps, x, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
            every, modulator=None):
    """Returns (output, final trace, checkpoints, the modulator's activity [T, B] or None)."""
    if modulator is not None:  # M_t is filled in step by step (see _modulated_step)
        modulation = torch.zeros((x.shape[0], x.shape[1], weight.shape[0]), dtype=x.dtype, device=x.device)
    p = _plastic_call(x, weight, alpha, eta, bias, drive, y0, modulation, clip, recurrent, rule, activation)
    new = lambda *shape: _alloc.empty(shape, dtype=p.acc, device=x.device)  # noqa: E731
    trace = new(p.B, p.out_features, p.in_features)
    trace.copy_(hebb) if hebb is not None else trace.zero_()
    p.output = _alloc.empty((p.T, p.B, p.out_features), dtype=x.dtype, device=x.device)
    checkpoints = new(-(-p.T // every), p.B, p.out_features, p.in_features)
    activity = None if modulator is None else x.new_zeros((p.T, p.B))
    unclipped = None if modulator is None else dataclasses.replace(p, has_clip=False)
    if p.T == 0 or p.B == 0 or (modulator is None and steps.sequence_forward(p, trace, checkpoints, every)):
        return p.output, trace, checkpoints, activity
    for t in range(p.T):
        if t % every == 0:
            checkpoints[t // every].copy_(trace)
        if modulator is None:
            steps.forward_step(p, t, p.pre(t).contiguous(), trace, update_only=False)
        else:
            _modulated_step(steps, p, unclipped, t, trace, modulator, activity)
    return p.output, trace, checkpoints, activity


def _modulated_step(steps, p, unclipped, t, trace, modulator, activity):
    """Endogenous modulation: y_t first (a step of `unclipped`, p without its clip, whose update
    adds M_t = 0: the trace is unchanged), then the modulator's M_t from y_t, then the step's
    update with it."""
    pre = p.pre(t).contiguous()
    steps.forward_step(unclipped, t, pre, trace, update_only=False)
    s = p.output[t].to(p.acc) @ modulator.weight.to(p.acc) + modulator.bias.to(p.acc)
    activity[t] = torch.tanh(s) if modulator.tanh else s
    p.modulation[t] = activity[t][:, None] * modulator.fanout
    steps.forward_step(p, t, pre, trace, update_only=True)


def _modulator_step_grad(p, t, pre, h, grad_trace, modulator, activity, carry):
    """Before the reverse step t: M_t was computed from y_t, so dL/dy_t also has the share through
    the modulator, dL/ds_t[b] * mod_weight[j], added into `carry`; returns dL/ds_t [B].
    dL/dM_t[b, j] = y_j <dL/dH_{t+1}[j, :], pre> (zero where the clip held the update)."""
    y = p.output[t].to(p.acc)
    g = grad_trace
    if p.has_clip:  # h is H_t (clip segments are recomputed)
        c = p.clip[0]
        nxt = h + (p.modulation[t].to(p.acc) * y)[:, :, None] * pre[:, None, :]
        g = torch.where((nxt < -c) | (nxt > c), torch.zeros((), dtype=g.dtype, device=g.device), g)
    grad_m = y * torch.bmm(g, pre[:, :, None])[:, :, 0]
    a = activity[t]
    grad_s = (grad_m @ modulator.fanout.to(p.acc)) * ((1 - a * a) if modulator.tanh else 1)
    carry += grad_s[:, None] * modulator.weight.to(p.acc)
    return grad_s


def backward(steps, grad_output, grad_hebb, x, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints,
             clip, recurrent, rule, activation, every, modulator=None, activity=None):
    """`op.py`'s plastic_backward contract."""
    if modulator is not None:  # the modulated rule's backward with the M_t the modulator produced
        modulation = modulator.modulation(activity)
    p = _plastic_call(x, weight, alpha, eta, None, None, y0, modulation, clip, recurrent, rule, activation)
    p.output, p.grad_output = _contiguous(output), _contiguous(grad_output)
    T, B, O, I, acc = p.T, p.B, p.out_features, p.in_features, p.acc
    blocks = -(-O // steps.rows_per_block(O, I))
    new = lambda *shape: _alloc.empty(shape, dtype=acc, device=x.device)  # noqa: E731
    zeros = lambda *shape: torch.zeros(shape, dtype=acc, device=x.device)  # noqa: E731
    trace = hebb_final.detach().to(acc).clone()
    grad_trace = (zeros(B, O, I) if grad_hebb is None else grad_hebb.detach().to(acc).clone()).contiguous()
    buffers = dict(grad_trace=grad_trace, grad_z=new(T, B, O), gpre_part=new(blocks, B, I),
                   galpha_part=zeros(B * blocks) if p.alpha_scalar else zeros(B, O, I), geta_part=zeros(B * blocks),
                   gmod_rows=zeros(B, O))
    grad_pre = None if recurrent else new(T, B, I)
    grad_mod = None if modulation is None else zeros(*modulation.shape)
    carry = zeros(B, O)
    grad_s = None if modulator is None else zeros(T, B)
    recompute = recomputes(clip, activation)
    segment, segment_start = None, None
    for t in range(T - 1, -1, -1):
        if recompute and (segment_start is None or t < segment_start):
            segment_start = (t // every) * every
            segment = [checkpoints[t // every].to(acc).clone()]
            for u in range(segment_start, t):
                segment.append(segment[-1].clone())
                steps.forward_step(p, u, p.pre(u).contiguous(), segment[-1], update_only=True)
        if not recompute and (t + 1) % every == 0 and t + 1 < T:
            trace.copy_(checkpoints[(t + 1) // every])  # restart the reconstruction from an exact trace
        h = segment[t - segment_start] if recompute else trace
        pre = p.pre(t).to(acc).contiguous()
        if modulator is not None:
            grad_s[t] = _modulator_step_grad(p, t, pre, h, buffers["grad_trace"], modulator, activity, carry)
        steps.backward_step(p, t, pre, h, carry, reconstruct=not recompute, **buffers)
        gp = buffers["gpre_part"].sum(0)
        if recurrent:
            carry = gp
        else:
            grad_pre[t] = gp
        if grad_mod is not None:
            grad_mod[t] = buffers["gmod_rows"] if modulation.dim() == 3 else buffers["gmod_rows"].sum(1)
    galpha = buffers["galpha_part"]
    grad_alpha = galpha.sum() if p.alpha_scalar else galpha.sum(0)
    cast = lambda g: None if g is None else g.to(x.dtype)  # noqa: E731
    mod_grads = (None,) * 3 if modulator is None else modulator_grads(grad_s, grad_mod, p.output, activity,
                                                                       x.dtype)
    grad_input, grad_weight, grad_bias, grad_drive = dense_grads(x, y0, output, buffers["grad_z"], grad_pre,
                                                                 recurrent)
    return (grad_input, grad_weight, cast(grad_alpha).view(alpha.shape), cast(buffers["geta_part"].sum()),
            cast(grad_trace), grad_bias, grad_drive, cast(carry) if recurrent else None,
            None if modulator else cast(grad_mod), *mod_grads)
