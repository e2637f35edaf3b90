"""The launchers the GPU plastic backends (Triton and CUDA C++) share: one call's tensors, its
buffers and the order of its launches, written once.

The time loop runs inside the kernels. A forward is one launch; a backward is two: the reverse
walk, then the reductions over (t, b) (weight and bias gradients) and over the sequences (the
reverse walk's per-sequence partial sums). A backend passes its kernels as the `kernels` argument,
an object with ``parts_per_sequence(call)`` (the programs or blocks that share a sequence and
each leave their partial sums), ``forward(call, buffers)``, ``backward(call, buffers)`` and
``reduce(call, buffers)``: `triton.TritonKernels`, `cuda.CudaKernels` (duck-typed: no common base
class). No
host synchronization, no ATen kernel around the launches: the kernels read the optional tensors
(initial trace, upstream gradients) where given and start from zeros where not.

Dtypes: the inputs, the parameters, the output and the parameters' gradients in the caller's
dtype; the trace, the checkpoints, every buffer a kernel reads back and every partial sum in the
accumulation dtype (`PlasticCall.acc`: float32 for 16-bit inputs). For 16-bit inputs
(`PlasticCall.narrow`) y_t, dL/dz_t and dL/dpre_t, which the kernels read back, live in
accumulation-dtype buffers, and the kernels also store them in the caller's dtype where they are
final; the forward returns y_t in the accumulation dtype as the state the backward reads.
"""

import dataclasses
from typing import Optional

import torch

from ... import _alloc
from .op import recomputes
from .rules import MODULATED, RULE_CODES


@dataclasses.dataclass
class PlasticCall:
    """One plastic call's tensors (contiguous) and options, as the kernels take them."""

    x: torch.Tensor
    weight: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    bias: Optional[torch.Tensor]
    drive: Optional[torch.Tensor]
    y0: Optional[torch.Tensor]
    modulation: Optional[torch.Tensor]  # given M_t [T, B] or [T, B, out]
    mod_weight: Optional[torch.Tensor]  # the modulator neuron's (endogenous modulation)
    mod_bias: Optional[torch.Tensor]  # None: 0
    mod_fanout: Optional[torch.Tensor]  # None: ones
    clip: float  # 0 when unused
    every: int  # steps between checkpoints
    recurrent: bool
    rule: int
    per_neuron: bool
    endogenous: bool
    mod_tanh: bool
    tanh: bool
    alpha_scalar: bool
    has_clip: bool
    recompute: bool  # the backward recomputes segments forward (clip, identity) instead of reconstructing

    T = property(lambda self: self.x.shape[0])  # steps
    B = property(lambda self: self.x.shape[1])  # sequences
    out_features = property(lambda self: self.weight.shape[0])
    in_features = property(lambda self: self.weight.shape[1])

    @property
    def acc(self):
        return _alloc.accumulation_dtype(self.x.dtype)

    @property
    def narrow(self):
        """Whether the caller's dtype is narrower than the accumulation dtype (16-bit inputs)."""
        return self.x.dtype != self.acc


@dataclasses.dataclass
class ForwardBuffers:
    hebb: Optional[torch.Tensor]  # the initial trace [B, out, in], or None for zeros
    trace: torch.Tensor  # the final trace [B, out, in] (written)
    output: torch.Tensor  # [T, B, out] in the caller's dtype (written)
    state: torch.Tensor  # y [T, B, out] in the accumulation dtype, read back: the output itself unless narrow (written)
    checkpoints: torch.Tensor  # [ceil(T / every), B, out, in]: H_0, H_every, ... (written)
    activity: Optional[torch.Tensor]  # the modulator's output [T, B] (written; endogenous only)


@dataclasses.dataclass
class BackwardBuffers:
    output: torch.Tensor  # the forward's y [T, B, out] in the accumulation dtype (its state)
    grad_output: Optional[torch.Tensor]  # [T, B, out], or None for zeros
    hebb_final: torch.Tensor  # the forward's final trace
    checkpoints: torch.Tensor
    activity: Optional[torch.Tensor]
    grad_hebb_in: Optional[torch.Tensor]  # dL/dH_T, or None for zeros
    trace: Optional[torch.Tensor]  # [B, out, in] scratch: the reconstructed trace (reconstructing only)
    segment: Optional[torch.Tensor]  # [every, B, out, in] scratch: a recomputed segment (recomputing only)
    grad_hebb: torch.Tensor  # dL/dH_0 [B, out, in] (written)
    grad_z: torch.Tensor  # dL/dz [T, B, out] (written)
    grad_pre: torch.Tensor  # dL/dx [T, B, in] (linear) or dL/dy0 [B, out] (rnn) (written)
    grad_z_out: torch.Tensor  # grad_z in the caller's dtype: grad_z itself unless narrow (written)
    grad_pre_out: torch.Tensor  # grad_pre in the caller's dtype: grad_pre itself unless narrow (written)
    grad_mod: Optional[torch.Tensor]  # like the given modulation, in the caller's dtype (written)
    mod_rows: Optional[torch.Tensor]  # [B, out] scratch: dL/dM_t (modulated)
    parts: int  # partial sums per sequence of eta and a 0-d alpha
    alpha_part: torch.Tensor  # [B, out, in], or [B * parts] for a 0-d alpha (written)
    eta_part: torch.Tensor  # [B * parts] (written)
    mod_weight_part: Optional[torch.Tensor]  # [B, out] (written; endogenous)
    mod_bias_part: Optional[torch.Tensor]  # [B] (written; endogenous, a mod_bias given)
    mod_fanout_part: Optional[torch.Tensor]  # [B, out] (written; endogenous, a mod_fanout given)
    grad_weight: torch.Tensor  # the reductions, in the caller's dtype (written by reduce)
    grad_bias: Optional[torch.Tensor]  # [out] (linear)
    grad_alpha: torch.Tensor
    grad_eta: torch.Tensor
    grad_mod_weight: Optional[torch.Tensor]
    grad_mod_bias: Optional[torch.Tensor]
    grad_mod_fanout: Optional[torch.Tensor]


def _contiguous(t):
    return None if t is None else t.contiguous()


def _plastic_call(x, weight, alpha, eta, bias, drive, y0, modulation, clip, recurrent, rule, activation, every,
                  modulator):
    c = _contiguous
    endogenous = modulator is not None
    return PlasticCall(
        x=c(x), weight=c(weight), alpha=c(alpha), eta=c(eta), bias=c(bias), drive=c(drive), y0=c(y0),
        modulation=c(modulation), mod_weight=c(modulator.weight) if endogenous else None,
        mod_bias=c(modulator.bias) if endogenous else None, mod_fanout=c(modulator.fanout) if endogenous else None,
        clip=float(clip) if clip is not None else 0.0, every=every, recurrent=recurrent,
        rule=MODULATED if modulation is not None or endogenous else RULE_CODES[rule],
        per_neuron=modulation is not None and modulation.dim() == 3, endogenous=endogenous,
        mod_tanh=endogenous and modulator.tanh, tanh=activation == "tanh", alpha_scalar=alpha.dim() == 0,
        has_clip=clip is not None, recompute=recomputes(clip, activation))


def forward(kernels, x, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
            every, modulator=None):
    """Returns (output, final trace, checkpoints, the modulator's activity [T, B] or None, the output in the
    accumulation dtype where it is narrower (16-bit inputs), else None)."""
    p = _plastic_call(x, weight, alpha, eta, bias, drive, y0, modulation, clip, recurrent, rule, activation, every,
                      modulator)
    T, B, O, I = p.T, p.B, p.out_features, p.in_features
    new = lambda *shape: _alloc.empty(shape, dtype=p.acc, device=x.device)  # noqa: E731
    output = _alloc.empty((T, B, O), dtype=x.dtype, device=x.device)
    buffers = ForwardBuffers(
        hebb=_contiguous(hebb), trace=new(B, O, I), output=output, state=new(T, B, O) if p.narrow else output,
        checkpoints=new(-(-T // every), B, O, I), activity=new(T, B) if p.endogenous else None)
    if B > 0:
        kernels.forward(p, buffers)
    return buffers.output, buffers.trace, buffers.checkpoints, buffers.activity, buffers.state if p.narrow else None


def backward(kernels, grad_output, grad_hebb, x, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints,
             clip, recurrent, rule, activation, every, modulator=None, activity=None):
    """`op.py`'s plastic_backward contract."""
    p = _plastic_call(x, weight, alpha, eta, None, None, y0, modulation, clip, recurrent, rule, activation, every,
                      modulator)
    T, B, O, I = p.T, p.B, p.out_features, p.in_features
    new = lambda *shape: _alloc.empty(shape, dtype=p.acc, device=x.device)  # noqa: E731
    final = lambda *shape: _alloc.empty(shape, dtype=x.dtype, device=x.device)  # noqa: E731  (a returned gradient)
    endogenous = lambda *shape: final(*shape) if p.endogenous else None  # noqa: E731
    if_given = lambda t, *shape: None if t is None else final(*shape)  # noqa: E731
    parts = kernels.parts_per_sequence(p)
    grad_z, grad_pre = new(T, B, O), new(B, O) if recurrent else new(T, B, I)
    narrowed = lambda t: final(*t.shape) if p.narrow else t  # noqa: E731
    b = BackwardBuffers(
        output=_contiguous(output), grad_output=_contiguous(grad_output), hebb_final=_contiguous(hebb_final),
        checkpoints=_contiguous(checkpoints), activity=_contiguous(activity), grad_hebb_in=_contiguous(grad_hebb),
        trace=None if p.recompute else new(B, O, I), segment=new(min(every, T), B, O, I) if p.recompute else None,
        grad_hebb=new(B, O, I), grad_z=grad_z, grad_pre=grad_pre, grad_z_out=narrowed(grad_z),
        grad_pre_out=narrowed(grad_pre), grad_mod=None if modulation is None else final(*modulation.shape),
        mod_rows=new(B, O) if p.rule == MODULATED else None,
        parts=parts, alpha_part=new(B * parts) if p.alpha_scalar else new(B, O, I), eta_part=new(B * parts),
        mod_weight_part=new(B, O) if p.endogenous else None,
        mod_bias_part=None if p.mod_bias is None else new(B),
        mod_fanout_part=None if p.mod_fanout is None else new(B, O), grad_weight=final(O, I),
        grad_bias=None if recurrent else final(O), grad_alpha=final(*alpha.shape),
        grad_eta=final(), grad_mod_weight=endogenous(O), grad_mod_bias=if_given(p.mod_bias),
        grad_mod_fanout=if_given(p.mod_fanout, O))
    if T == 0:
        _no_steps(b)
    elif B > 0:
        kernels.backward(p, b)
    kernels.reduce(p, b)
    if recurrent:  # the input enters z directly
        grad_input, grad_drive, grad_y0 = b.grad_z_out, None, b.grad_pre_out
    else:
        grad_input, grad_drive, grad_y0 = b.grad_pre_out, b.grad_z_out, None
    return (grad_input, b.grad_weight, b.grad_alpha, b.grad_eta, b.grad_hebb, b.grad_bias, grad_drive, grad_y0,
            b.grad_mod, b.grad_mod_weight, b.grad_mod_bias, b.grad_mod_fanout)


def _no_steps(b):
    """An empty sequence: the trace passes through, nothing else has a gradient."""
    if b.grad_hebb_in is None:
        b.grad_hebb.zero_()
    else:
        b.grad_hebb.copy_(b.grad_hebb_in)
    narrow = b.grad_pre_out if b.grad_pre_out is not b.grad_pre else None
    for part in (b.grad_pre, narrow, b.alpha_part, b.eta_part, b.mod_weight_part, b.mod_bias_part, b.mod_fanout_part):
        if part is not None:
            part.zero_()
