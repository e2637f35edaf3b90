"""Hebbian plasticity: differentiable plasticity (Miconi et al. 2018) and backpropamine (SPEC section 4).

Per connection j <- i the effective weight is ``weight[j, i] + alpha[j, i] * hebb[b, j, i]``.

    plastic_linear:  y_t = act((W + alpha * H_t) x_t + bias + drive_t),     H_{t+1} = rule(H_t, x_t, y_t)
    plastic_rnn:     y_t = act((W + alpha * H_t) y_{t-1} + input_t),        H_{t+1} = rule(H_t, y_{t-1}, y_t)

Rules (post = y[j], pre = x[i]):  "hebb"  H' = (1 - eta) H + eta post pre
                                  "oja"   H' = H + eta post (pre - post H)
                                  modulated (plastic_rnn, modulation given) H' = H + M_t[j] post pre
                                  clip c (plastic_rnn): H' <- clamp(H', -c, c)

Where things are:

* reference (the oracle): `plastic_linear_reference`, `plastic_rnn_reference`, below. Eager
  autograd keeps one trace per step: O(T * B * N^2) memory.
* kernels: kernels/plastic.py (Triton: whole sequence in one launch, trace in registers, for
  N <= 128; one launch per step above), neuronml_fast/cpu/plastic.py + csrc/cpu/plastic.cpp
  (C++ CPU). Both: one fused pass over
  the trace per step (pre-activation row and trace update together), and a backward that walks
  time in reverse, reconstructing each trace from the next (the rules are invertible), so
  training memory is O(B * N^2) whatever T.
* custom ops, autograd and public functions: below.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _alloc, _checks, backends

RULES = ("hebb", "oja")
ACTIVATIONS = ("tanh", "identity")


# ---- reference -----------------------------------------------------------------------------


def _activation(z, activation):
    return torch.tanh(z) if activation == "tanh" else z


def _rule(hebb, pre, post, eta, rule, modulation=None, clip=None):
    """One trace update. hebb [B, out, in], pre [B, in], post [B, out], modulation [B] or [B, out]."""
    outer = post[:, :, None] * pre[:, None, :]
    if modulation is not None:
        m = modulation[:, None, None] if modulation.dim() == 1 else modulation[:, :, None]
        hebb = hebb + m * outer
    elif rule == "hebb":
        hebb = (1 - eta) * hebb + eta * outer
    else:
        hebb = hebb + eta * post[:, :, None] * (pre[:, None, :] - post[:, :, None] * hebb)
    if clip is not None:
        hebb = hebb.clamp(-clip, clip)
    return hebb


def _upcast(dtype, *tensors):
    return [None if t is None else t.to(dtype) if torch.is_tensor(t) else t for t in tensors]


def plastic_linear_reference(input, weight, alpha, eta, hebb=None, bias=None, drive=None, rule="hebb",
                             activation="tanh"):
    """Plain eager PyTorch, step by step: the oracle. Returns (output [T, B, out], hebb [B, out, in])."""
    acc = _alloc.accumulation_dtype(input.dtype)
    T, B = input.shape[:2]
    out_features, in_features = weight.shape
    x, weight, alpha, eta, hebb, bias, drive = _upcast(acc, input, weight, alpha, eta, hebb, bias, drive)
    trace = x.new_zeros((B, out_features, in_features)) if hebb is None else hebb
    outputs = []
    for t in range(T):
        z = torch.einsum("boi,bi->bo", weight + alpha * trace, x[t])
        if bias is not None:
            z = z + bias
        if drive is not None:
            z = z + drive[t]
        y = _activation(z, activation)
        outputs.append(y)
        trace = _rule(trace, x[t], y, eta, rule)
    output = torch.stack(outputs) if outputs else x.new_zeros((0, B, out_features))
    return output.to(input.dtype), trace


def plastic_rnn_reference(input, weight, alpha, eta, y0=None, hebb=None, modulation=None, clip=None, rule="hebb",
                          activation="tanh"):
    """Plain eager PyTorch, step by step: the oracle. Returns (output [T, B, N], hebb [B, N, N])."""
    acc = _alloc.accumulation_dtype(input.dtype)
    T, B, N = input.shape
    x, weight, alpha, eta, y0, hebb, modulation = _upcast(acc, input, weight, alpha, eta, y0, hebb, modulation)
    trace = x.new_zeros((B, N, N)) if hebb is None else hebb
    y = x.new_zeros((B, N)) if y0 is None else y0
    outputs = []
    for t in range(T):
        y_new = _activation(torch.einsum("bji,bi->bj", weight + alpha * trace, y) + x[t], activation)
        trace = _rule(trace, y, y_new, eta, rule, None if modulation is None else modulation[t], clip)
        outputs.append(y_new)
        y = y_new
    output = torch.stack(outputs) if outputs else x.new_zeros((0, B, N))
    return output.to(input.dtype), trace


# ---- argument checks -----------------------------------------------------------------------

OP = "plastic"
for _suffix, _stage in (("", "forward"), ("_backward", "backward")):
    backends.register_op(OP + _suffix, kernels={
        "cpu": (f"neuronml_fast.cpu.plastic:plastic_{_stage}", backends.FULL_DTYPES),
        "triton": (f"neuronml_fast.kernels.plastic:plastic_{_stage}", backends.FULL_DTYPES),
        "cuda": (f"neuronml_fast.cuda.plastic:plastic_{_stage}", backends.FULL_DTYPES),
    })


def _eta_number(eta):
    return float(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) else None


def _as_eta(eta, like):
    if isinstance(eta, (int, float)) and not isinstance(eta, bool):
        return torch.tensor(float(eta), dtype=like.dtype, device=like.device)
    _checks.floating_tensor("eta", eta, ndim=0)
    return eta


def _validate_plastic(input, weight, alpha, eta, hebb, *, recurrent, rule, activation, bias=None, drive=None,
                      y0=None, modulation=None, clip=None):
    _checks.floating_tensor("input", input, ndim=3)
    _checks.floating_tensor("weight", weight, ndim=2)
    _checks.like("weight", weight, "input", input, shape=weight.shape)
    T, B, features = input.shape
    out_features, in_features = weight.shape
    if recurrent and out_features != in_features:
        raise ValueError(f"weight: expected a square [N, N] recurrent weight, got shape {list(weight.shape)}")
    expected = out_features if recurrent else in_features
    if features != expected:
        raise ValueError(f"input: expected {expected} features in the last dimension, got shape {list(input.shape)}")
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    _checks.floating_tensor("alpha", alpha)
    _checks.like("alpha", alpha, "input", input, shape=alpha.shape)
    if alpha.dim() != 0 and alpha.shape != weight.shape:
        raise ValueError(f"alpha: expected a 0-d tensor or shape {list(weight.shape)}, got {list(alpha.shape)}")
    _checks.like("eta", eta, "input", input, shape=())
    if hebb is not None:
        _checks.like("hebb", hebb, "input", input, shape=(B, out_features, in_features))
    if bias is not None:
        _checks.like("bias", bias, "input", input, shape=(out_features,))
    if drive is not None:
        _checks.like("drive", drive, "input", input, shape=(T, B, out_features))
    if y0 is not None:
        _checks.like("y0", y0, "input", input, shape=(B, out_features))
    if modulation is not None:
        _checks.floating_tensor("modulation", modulation)
        if modulation.shape not in ((T, B), (T, B, out_features)):
            raise ValueError(f"modulation: expected shape {[T, B]} or {[T, B, out_features]}, "
                             f"got {list(modulation.shape)}")
        _checks.like("modulation", modulation, "input", input, shape=modulation.shape)
    if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0):
        raise ValueError(f"clip: expected a positive number or None, got {clip!r}")


# ---- custom ops ----------------------------------------------------------------------------


@torch.library.custom_op("neuronml_fast::plastic", mutates_args=())
def plastic_op(
    input: Tensor, weight: Tensor, alpha: Tensor, eta: Tensor, hebb: Optional[Tensor], bias: Optional[Tensor],
    drive: Optional[Tensor], y0: Optional[Tensor], modulation: Optional[Tensor], clip: Optional[float],
    recurrent: bool, rule: str, activation: str, checkpoint_every: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output [T, B, out], final hebb [B, out, in], the traces kept every checkpoint_every steps)."""
    return backends.kernel(OP, backend)(input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip,
                                        recurrent, rule, activation, checkpoint_every)


@plastic_op.register_fake
def _(input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
      checkpoint_every, backend):
    T, B = input.shape[:2]
    out_features, in_features = weight.shape
    checkpoints = input.new_empty((-(-T // checkpoint_every), B, out_features, in_features))
    return input.new_empty((T, B, out_features)), input.new_empty((B, out_features, in_features)), checkpoints


@torch.library.custom_op("neuronml_fast::plastic_backward", mutates_args=())
def plastic_backward_op(
    grad_output: Tensor, grad_hebb: Optional[Tensor], input: Tensor, weight: Tensor, alpha: Tensor, eta: Tensor,
    y0: Optional[Tensor], modulation: Optional[Tensor], output: Tensor, hebb_final: Tensor, checkpoints: Tensor,
    clip: Optional[float], recurrent: bool, rule: str, activation: str, checkpoint_every: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (input, weight, alpha, eta, hebb, bias, drive, y0, modulation); an empty tensor
    stands for a gradient the layer does not have (y0 of a linear layer, say)."""
    grads = backends.kernel(f"{OP}_backward", backend)(
        grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints, clip,
        recurrent, rule, activation, checkpoint_every)
    return tuple(input.new_empty((0,)) if g is None else g for g in grads)


@plastic_backward_op.register_fake
def _(grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints, clip,
      recurrent, rule, activation, checkpoint_every, backend):
    T, B = input.shape[:2]
    out_features, in_features = weight.shape
    absent = lambda: input.new_empty((0,))  # noqa: E731  (one each: outputs may not alias each other)
    return (input.new_empty(input.shape), weight.new_empty(weight.shape), alpha.new_empty(alpha.shape),
            eta.new_empty(()), input.new_empty((B, out_features, in_features)), input.new_empty((out_features,)),
            input.new_empty((T, B, out_features)), input.new_empty((B, out_features)) if recurrent else absent(),
            absent() if modulation is None else modulation.new_empty(modulation.shape))


def _setup_context(ctx, inputs, output):
    (input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
     checkpoint_every, backend) = inputs
    ctx.options = (clip, recurrent, rule, activation, checkpoint_every, backend)
    ctx.present = tuple(t is not None for t in (hebb, bias, drive, y0, modulation))
    ctx.save_for_backward(input, weight, alpha, eta, y0, modulation, output[0], output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_hebb, _grad_checkpoints):
    input, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(output)
    grads = plastic_backward_op(grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final,
                                checkpoints, *ctx.options)
    g_input, g_weight, g_alpha, g_eta, g_hebb, g_bias, g_drive, g_y0, g_mod = grads
    has_hebb, has_bias, has_drive, has_y0, has_mod = ctx.present
    return (g_input, g_weight, g_alpha, g_eta, g_hebb if has_hebb else None, g_bias if has_bias else None,
            g_drive if has_drive else None, g_y0 if has_y0 else None, g_mod if has_mod else None,
            None, None, None, None, None, None)


plastic_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions ----------------------------------------------------------------------


_GPU_BACKENDS = ("triton", "cuda")


def _eta_and_checkpoints(input, eta, number, clip, modulation, rule, activation, backend):
    """Checks eta's domain and returns the checkpoint interval, reading eta on the host only where
    that costs nothing or the interval needs it.

    The GPU backends keep the launch path free of device-to-host syncs: eta is read only when the
    trace reconstruction's checkpoint interval depends on it (hebb and oja under tanh, no clip, a
    device tensor), once, and that read also serves the domain check. Elsewhere (modulated rule,
    recomputed segments, a Python number) nothing is read and a device tensor's domain is checked on
    the device: an error raised there, at the next synchronization, names eta all the same.
    """
    from ..cpu.plastic import checkpoint_every
    from .._plastic_driver import recomputes

    uses_eta = modulation is None
    needs_value = uses_eta and not recomputes(clip, activation)
    compiling = torch.compiler.is_compiling()
    if number is not None:
        value = number
    elif compiling or (backend in _GPU_BACKENDS and not needs_value):
        value = None
    else:
        value = float(eta.detach())
    if uses_eta and value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"eta: expected 0 <= eta < 1 for rule {rule!r}, got {value}")
    if uses_eta and value is None and not compiling:
        torch._assert_async((eta.detach() >= 0) & (eta.detach() < 1), f"eta: expected 0 <= eta < 1 for rule {rule!r}")
    return checkpoint_every(input.shape[0], value, clip, modulation is not None, activation)


def plastic_linear(input, weight, alpha, eta, hebb=None, bias=None, drive=None, rule="hebb", activation="tanh"):
    """A plastic linear layer over a sequence (SPEC section 4).

    ``y_t = act((weight + alpha * H_t) x_t + bias + drive_t)``, ``H_{t+1} = rule(H_t, x_t, y_t)``.
    ``input [T, B, in]``, ``weight [out, in]``, ``alpha [out, in]`` or 0-d, ``eta`` 0-d (or a
    number), ``hebb [B, out, in]`` (zeros by default), ``drive [T, B, out]``. Returns
    ``(output [T, B, out], hebb [B, out, in])``.
    """
    number, eta = _eta_number(eta), _as_eta(eta, input)
    _validate_plastic(input, weight, alpha, eta, hebb, recurrent=False, rule=rule, activation=activation, bias=bias,
                      drive=drive)
    backend = backends.resolve(OP, input.device.type, input.dtype)
    every = _eta_and_checkpoints(input, eta, number, None, None, rule, activation, backend)
    if backend == "reference":
        return plastic_linear_reference(input, weight, alpha, eta, hebb, bias, drive, rule, activation)
    output, hebb, _ = plastic_op(input, weight, alpha, eta, hebb, bias, drive, None, None, None, False, rule,
                                 activation, every, backend)
    return output, hebb


def plastic_rnn(input, weight, alpha, eta, y0=None, hebb=None, modulation=None, clip=None, rule="hebb",
                activation="tanh"):
    """A recurrent plastic layer (SPEC section 4): ``y_t = act((weight + alpha * H_t) y_{t-1} + input_t)``.

    ``input [T, B, N]``, ``weight [N, N]``, ``y0 [B, N]`` (zeros by default), ``modulation``
    ``[T, B]`` or ``[T, B, N]`` (backpropamine: replaces the rule by ``H + M post pre``), ``clip``
    an optional bound on the trace. Returns ``(output [T, B, N], hebb [B, N, N])``.
    """
    number, eta = _eta_number(eta), _as_eta(eta, input)
    _validate_plastic(input, weight, alpha, eta, hebb, recurrent=True, rule=rule, activation=activation, y0=y0,
                      modulation=modulation, clip=clip)
    backend = backends.resolve(OP, input.device.type, input.dtype)
    clip = None if clip is None else float(clip)
    every = _eta_and_checkpoints(input, eta, number, clip, modulation, rule, activation, backend)
    if backend == "reference":
        return plastic_rnn_reference(input, weight, alpha, eta, y0, hebb, modulation, clip, rule, activation)
    output, hebb, _ = plastic_op(input, weight, alpha, eta, hebb, None, None, y0, modulation, clip, True, rule,
                                 activation, every, backend)
    return output, hebb
