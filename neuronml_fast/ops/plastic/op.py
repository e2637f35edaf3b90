"""Hebbian plasticity: differentiable plasticity (Miconi et al. 2018) and backpropamine (SPEC section 4).

Per connection j <- i the effective weight is ``weight[j, i] + alpha[j, i] * hebb[b, j, i]``.

    plastic_linear:  y_t = act((W + alpha * H_t) x_t + bias + drive_t),     H_{t+1} = rule(H_t, x_t, y_t)
    plastic_rnn:     y_t = act((W + alpha * H_t) y_{t-1} + input_t),        H_{t+1} = rule(H_t, y_{t-1}, y_t)

Rules (post = y[j], pre = x[i]):  "hebb"  H' = (1 - eta) H + eta post pre
                                  "oja"   H' = H + eta post (pre - post H)
                                  modulated (plastic_rnn) H' = H + M_t[j] post pre, M_t given or
                                      endogenous: M_t[j] = fanout[j] mod_act(mod_weight . y_t + mod_bias)
                                  clip c (plastic_rnn): H' <- clamp(H', -c, c)

Where things are (this folder):

* ``reference.py``: `plastic_linear_reference`, `plastic_rnn_reference`, the oracle.
* ``op.py`` (here): argument checks, the custom ops ``neuronml_fast::plastic`` and
  ``plastic_backward``, their fakes and autograd, the GEMM-shaped gradients (weight, bias, the
  modulator's) for a launcher whose kernels do not form them, the checkpoint policy, the public
  functions.
* launchers, one module per backend, each with ``plastic_forward`` and ``plastic_backward`` (the
  contract below): ``cpu.py`` (the whole time loop in C++: csrc/cpu/plastic.cpp); ``gpu.py``, the
  launchers the GPU backends share, with their kernels (each running the whole time loop) in
  ``triton.py`` (kernels/plastic.py) and ``cuda.py`` (csrc/cuda/plastic.cu). ``rules.py``: the
  rule codes every kernel takes.

All: one fused pass over the trace per step (pre-activation row and trace update together), and
a backward that walks time in reverse, reconstructing each trace from the next (the rules are
invertible), so training memory is O(B * N^2) whatever T.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ... import _alloc, _checks, backends
from .. import _autocast
from .reference import plastic_linear_reference, plastic_rnn_reference

RULES = ("hebb", "oja")
ACTIVATIONS = ("tanh", "identity")


# ---- argument checks -----------------------------------------------------------------------

OP = "plastic"
for _op in (OP, f"{OP}_backward"):
    backends.register_op(_op, family="plastic")


def _eta_number(eta):
    return float(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) else None


def _as_eta(eta, like):
    if isinstance(eta, (int, float)) and not isinstance(eta, bool):
        return torch.tensor(float(eta), dtype=like.dtype, device=like.device)
    _checks.floating_tensor("eta", eta, ndim=0)
    return eta


def _validate_plastic(input, weight, alpha, eta, hebb, *, recurrent, rule, activation, bias=None, drive=None,
                      y0=None, modulation=None, clip=None, modulator=None):
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
        _checks.like_in_dtypes("hebb", hebb, "input", input, _trace_dtypes(input.dtype),
                               shape=(B, out_features, in_features))
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
    if modulator is not None:
        _validate_modulator(input, modulator, modulation)


def trace_dtype(dtype):
    """The dtype of the trace an op returns for inputs of ``dtype``: the accumulation dtype, float32
    for 16-bit inputs (SPEC section 4). ``hebb=`` takes it or the input's dtype, so a returned trace
    can always be passed back."""
    return _alloc.accumulation_dtype(dtype)


def _trace_dtypes(dtype):
    """The dtypes ``hebb=`` takes for inputs of ``dtype``, and what each is."""
    accepted = {dtype: "the dtype of input"}
    accepted.setdefault(trace_dtype(dtype), "the dtype of the trace the op returns")
    return accepted


def _validate_modulator(input, modulator, modulation):
    mod_weight, mod_bias, mod_fanout, mod_activation = modulator
    N = input.shape[-1]
    if modulation is not None:
        raise ValueError("mod_weight: expected None when modulation is given (the modulation is either given or "
                         "computed by the modulator), got a tensor")
    _checks.like("mod_weight", mod_weight, "input", input, shape=(N,))
    if mod_bias is not None:
        _checks.like("mod_bias", mod_bias, "input", input, shape=())
    if mod_fanout is not None:
        _checks.like("mod_fanout", mod_fanout, "input", input, shape=(N,))
    if mod_activation not in ACTIVATIONS:
        raise ValueError(f"mod_activation: expected one of {ACTIVATIONS}, got {mod_activation!r}")


# ---- custom ops ----------------------------------------------------------------------------
#
# A backend's launchers:
#   plastic_forward(input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule,
#                   activation, checkpoint_every, modulator)
#       -> (output, final hebb, checkpoints, the modulator's activity [T, B] or None, the output in the
#           accumulation dtype where that is wider than the input's (16-bit inputs: the state the
#           recurrence and the backward read), else None)
#   plastic_backward(grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final,
#                    checkpoints, clip, recurrent, rule, activation, checkpoint_every, modulator, activity)
#       (``output``: the forward's output in the accumulation dtype)
#       -> the gradients of (input, weight, alpha, eta, hebb, bias, drive, y0, modulation, mod_weight,
#           mod_bias, mod_fanout) in the input's dtype (hebb's in the trace dtype), None for one the
#           call does not have (y0 of a
#           linear layer, bias and drive of the rnn, the modulator's without one); `dense_grads` and
#           `modulator_grads` form the GEMM-shaped ones from the reverse walk's dL/dz for a launcher
#           whose kernels do not.
# `modulator` is None or a `Modulator` (bias and fanout may be None); `activity` is the modulator's
# output [T, B] the forward returned (M_t = activity_t * fanout).


class Modulator(NamedTuple):
    """Backpropamine's modulator neuron (endogenous modulation): a bias of None is 0, a fanout of
    None is ones (the GPU kernels take them so, with no tensor made for them)."""
    weight: Tensor  # [N]
    bias: Optional[Tensor]  # 0-d
    fanout: Optional[Tensor]  # [N]
    tanh: bool

    def fanout_or_ones(self):
        return torch.ones_like(self.weight) if self.fanout is None else self.fanout

    def modulation(self, activity):
        """M_t [T, B, N] from the modulator's activity [T, B]."""
        return activity[..., None] * self.fanout_or_ones().to(activity.dtype)


def _modulator(mod_weight, mod_bias, mod_fanout, mod_tanh):
    return None if mod_weight is None else Modulator(mod_weight, mod_bias, mod_fanout, mod_tanh)


@torch.library.custom_op("neuronml_fast::plastic", mutates_args=())
def plastic_op(
    input: Tensor, weight: Tensor, alpha: Tensor, eta: Tensor, hebb: Optional[Tensor], bias: Optional[Tensor],
    drive: Optional[Tensor], y0: Optional[Tensor], modulation: Optional[Tensor], clip: Optional[float],
    recurrent: bool, rule: str, activation: str, checkpoint_every: int, mod_weight: Optional[Tensor],
    mod_bias: Optional[Tensor], mod_fanout: Optional[Tensor], mod_tanh: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output [T, B, out], final hebb [B, out, in], the traces kept every checkpoint_every steps,
    the modulator's activity [T, B] (empty without a modulator), the output in the accumulation dtype
    [T, B, out] where that is wider than the input's (16-bit inputs), else empty: what the backward reads)."""
    output, trace, checkpoints, activity, state = backends.launchers(OP, backend).plastic_forward(
        input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
        checkpoint_every, _modulator(mod_weight, mod_bias, mod_fanout, mod_tanh))
    absent = lambda: input.new_empty((0,), dtype=_alloc.accumulation_dtype(input.dtype))  # noqa: E731
    return (output, trace, checkpoints, absent() if activity is None else activity,
            absent() if state is None else state)


def _narrow(dtype):
    """Whether the plastic ops keep their state in a wider dtype than ``dtype`` (16-bit)."""
    return _alloc.accumulation_dtype(dtype) != dtype


@plastic_op.register_fake
def _(input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
      checkpoint_every, mod_weight, mod_bias, mod_fanout, mod_tanh, backend):
    T, B = input.shape[:2]
    out_features, in_features = weight.shape
    acc = _alloc.accumulation_dtype(input.dtype)
    checkpoints = input.new_empty((-(-T // checkpoint_every), B, out_features, in_features), dtype=acc)
    activity = input.new_empty((0,) if mod_weight is None else (T, B), dtype=acc)
    trace = input.new_empty((B, out_features, in_features), dtype=trace_dtype(input.dtype))
    state = input.new_empty((T, B, out_features) if _narrow(input.dtype) else (0,), dtype=acc)
    return input.new_empty((T, B, out_features)), trace, checkpoints, activity, state


@torch.library.custom_op("neuronml_fast::plastic_backward", mutates_args=())
def plastic_backward_op(
    grad_output: Tensor, grad_hebb: Optional[Tensor], input: Tensor, weight: Tensor, alpha: Tensor, eta: Tensor,
    y0: Optional[Tensor], modulation: Optional[Tensor], output: Tensor, hebb_final: Tensor, checkpoints: Tensor,
    clip: Optional[float], recurrent: bool, rule: str, activation: str, checkpoint_every: int,
    mod_weight: Optional[Tensor], mod_bias: Optional[Tensor], mod_fanout: Optional[Tensor], mod_tanh: bool,
    activity: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (input, weight, alpha, eta, hebb, bias, drive, y0, modulation, mod_weight, mod_bias,
    mod_fanout); an empty tensor stands for a gradient the call does not have (y0 of a linear layer, say)."""
    grads = backends.launchers(OP, backend).plastic_backward(
        grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints, clip,
        recurrent, rule, activation, checkpoint_every, _modulator(mod_weight, mod_bias, mod_fanout, mod_tanh),
        activity if mod_weight is not None else None)
    return tuple(input.new_empty((0,)) if g is None else g for g in grads)


def dense_grads(x, y0, output, grad_z, grad_pre, recurrent):
    """Gradients of (input, weight, bias, drive) from dL/dz [T, B, out] and, for a linear layer, dL/dx:
    GEMM-shaped reductions over time and batch. The rnn's input enters
    z directly, so its gradient is dL/dz itself, and it has no bias. The weight's is one matrix
    product over (t, b) of dL/dz_t and the presynaptic activity (x_t; y_{t-1}, with y0 first,
    taken from the output and y0 in place)."""
    features = grad_z.shape[-1]
    gz = grad_z.reshape(-1, features)
    cast = lambda g: None if g is None else g.to(x.dtype)  # noqa: E731
    if not recurrent:
        grad_weight = gz.t() @ x.reshape(-1, x.shape[-1]).to(gz.dtype)
        return cast(grad_pre), cast(grad_weight), cast(grad_z.sum((0, 1))), cast(grad_z)
    batch = x.shape[1]
    previous = output[:-1].reshape(-1, features).to(gz.dtype)
    grad_weight = gz[batch:].t() @ previous
    if y0 is not None and grad_z.shape[0] > 0:
        grad_weight = torch.addmm(grad_weight, gz[:batch].t(), y0.to(gz.dtype))
    return cast(grad_z), cast(grad_weight), None, None


def modulator_grads(grad_s, grad_modulation, output, activity, dtype):
    """Gradients of (mod_weight, mod_bias, mod_fanout) from dL/ds [T, B] (s = mod_weight . y_t + mod_bias)
    and dL/dM [T, B, N]: reductions over time and batch."""
    acc = grad_s.dtype
    return (torch.einsum("tb,tbj->j", grad_s, output.to(acc)).to(dtype), grad_s.sum().to(dtype),
            torch.einsum("tbj,tb->j", grad_modulation.to(acc), activity).to(dtype))


@plastic_backward_op.register_fake
def _(grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints, clip,
      recurrent, rule, activation, checkpoint_every, mod_weight, mod_bias, mod_fanout, mod_tanh, activity, backend):
    T, B = input.shape[:2]
    out_features, in_features = weight.shape
    absent = lambda: input.new_empty((0,))  # noqa: E731  (one each: outputs may not alias each other)
    endogenous = mod_weight is not None
    return (input.new_empty(input.shape), weight.new_empty(weight.shape), alpha.new_empty(alpha.shape),
            eta.new_empty(()), input.new_empty((B, out_features, in_features), dtype=trace_dtype(input.dtype)),
            absent() if recurrent else input.new_empty((out_features,)),
            absent() if recurrent else input.new_empty((T, B, out_features)),
            input.new_empty((B, out_features)) if recurrent else absent(),
            absent() if modulation is None else modulation.new_empty(modulation.shape),
            input.new_empty((out_features,)) if endogenous else absent(),
            input.new_empty(()) if endogenous else absent(),
            input.new_empty((out_features,)) if endogenous else absent())


def _setup_context(ctx, inputs, output):
    (input, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
     checkpoint_every, mod_weight, mod_bias, mod_fanout, mod_tanh, backend) = inputs
    ctx.options = (clip, recurrent, rule, activation, checkpoint_every)
    ctx.modulator_options = (mod_tanh, backend)
    ctx.present = tuple(t is not None for t in (hebb, bias, drive, y0, modulation, mod_weight, mod_bias, mod_fanout))
    state = output[4] if _narrow(input.dtype) else output[0]  # the output as the backward reads it
    ctx.save_for_backward(input, weight, alpha, eta, y0, modulation, state, output[1], output[2], mod_weight,
                          mod_bias, mod_fanout, output[3])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_hebb, _grad_checkpoints, _grad_activity, _grad_state):
    (input, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints, mod_weight, mod_bias, mod_fanout,
     activity) = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(output, dtype=input.dtype)
    mod_tanh, backend = ctx.modulator_options
    grads = plastic_backward_op(grad_output, grad_hebb, input, weight, alpha, eta, y0, modulation, output, hebb_final,
                                checkpoints, *ctx.options, mod_weight, mod_bias, mod_fanout, mod_tanh, activity,
                                backend)
    # grads of (input, weight, alpha, eta) always; the optional ones only where the call had them
    optional = [g if present else None for g, present in zip(grads[4:], ctx.present)]
    return (*grads[:4], *optional[:5], None, None, None, None, None, *optional[5:], None, None)


plastic_op.register_autograd(_backward, setup_context=_setup_context)
# The RNN cells' autocast, the trace (argument 4, output 1) kept in float32; checkpoints, the
# modulator's activity and the wide state are the backward's, in the dtype it computes in.
_autocast.register(plastic_op, OP, _autocast.Policy(_autocast.LOWER, state_inputs=(4,), cast_outputs=(0,)))
_autocast.register(plastic_backward_op, f"{OP}_backward", _autocast.Policy(_autocast.AS_GIVEN))


# ---- the checkpoint policy (every backend keeps the traces the op asks for) -----------------


def recomputes(clip, activation):
    """Segments are recomputed forward (not reconstructed) under clip and identity activation."""
    return clip is not None or activation == "identity"


AMPLIFICATION_BUDGET = 256.0  # how much rounding may grow while reconstructing one segment
COMPILE_CHECKPOINT_EVERY = 16  # eta cannot be read while tracing: a safe interval for eta <= 0.3


def checkpoint_every(steps, eta, clip, modulated, activation="tanh"):
    """Steps between stored traces.

    Recomputed segments (see `recomputes`): ~sqrt(T) steps. Otherwise the
    backward reconstructs traces, and undoing a (1 - eta) decay amplifies rounding by 1 / (1 - eta)
    per step: store a trace every ln(256) / -ln(1 - eta) steps (550 at eta = 0.01), so float32
    gradients stay accurate at any T while memory stays flat up to that many steps.
    """
    steps = max(steps, 1)
    if recomputes(clip, activation):
        return max(1, math.isqrt(steps))
    if modulated:
        return steps  # additive updates: nothing compounds
    if eta is None:
        return COMPILE_CHECKPOINT_EVERY
    eta = float(eta)
    if eta <= 0.0:
        return steps
    return int(min(steps, max(1.0, math.log(AMPLIFICATION_BUDGET) / -math.log1p(-min(eta, 0.999)))))


# ---- public functions ----------------------------------------------------------------------


def _avoids_host_reads(backend):
    """Whether the backend's launchers keep device-to-host reads off the launch path: a launcher
    module declares it with ``AVOIDS_HOST_READS`` (the GPU ones, whatever tensors they run on)."""
    return backend != "reference" and getattr(backends.launchers(OP, backend), "AVOIDS_HOST_READS", False)


def _eta_and_checkpoints(input, eta, number, clip, modulated, rule, activation, backend):
    """Checks eta's domain and returns the checkpoint interval, reading eta on the host only where
    that costs nothing or the interval needs it.

    A GPU backend's launch path stays free of device-to-host syncs: eta is read only when the
    trace reconstruction's checkpoint interval depends on it (hebb and oja under tanh, no clip, a
    device tensor), once, and that read also serves the domain check. Elsewhere (modulated rule,
    recomputed segments, a Python number) nothing is read and a device tensor's domain is checked on
    the device: an error raised there, at the next synchronization, names eta all the same.
    """
    uses_eta = not modulated
    needs_value = uses_eta and not recomputes(clip, activation)
    compiling = torch.compiler.is_compiling()
    if number is not None:
        value = number
    elif compiling or (_avoids_host_reads(backend) and not needs_value):
        value = None
    else:
        value = float(eta.detach())
    if uses_eta and value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"eta: expected 0 <= eta < 1 for rule {rule!r}, got {value}")
    if uses_eta and value is None and not compiling:
        # floor(eta) == 0 is 0 <= eta < 1 (NaN fails too): two elementwise kernels and the assert.
        torch._assert_async(eta.detach().floor() == 0, f"eta: expected 0 <= eta < 1 for rule {rule!r}")
    return checkpoint_every(input.shape[0], value, clip, modulated, activation)


def plastic_linear(input, weight, alpha, eta, hebb=None, bias=None, drive=None, rule="hebb", activation="tanh"):
    """A plastic linear layer over a sequence (SPEC section 4).

    ``y_t = act((weight + alpha * H_t) x_t + bias + drive_t)``, ``H_{t+1} = rule(H_t, x_t, y_t)``.
    ``input [T, B, in]``, ``weight [out, in]``, ``alpha [out, in]`` or 0-d, ``eta`` 0-d (or a
    number), ``hebb [B, out, in]`` (zeros by default), ``drive [T, B, out]``. Returns
    ``(output [T, B, out], hebb [B, out, in])``; the trace is in `trace_dtype` (float32 for 16-bit
    inputs), and ``hebb=`` takes that dtype or the input's, so ``out, h = f(x, ..., hebb=h)`` carries it.
    Under ``torch.autocast`` it computes as the RNN cells do: inputs and output in the autocast dtype,
    the trace in float32 (`neuronml_fast.ops._autocast`).
    """
    number, eta = _eta_number(eta), _as_eta(eta, input)
    backend, (input, weight, alpha, eta, hebb, bias, drive) = _autocast.autocast_inputs(
        OP, _autocast.LOWER, input.device.type, input.dtype, (input, weight, alpha, eta, hebb, bias, drive),
        state_inputs=(4,))
    _validate_plastic(input, weight, alpha, eta, hebb, recurrent=False, rule=rule, activation=activation, bias=bias,
                      drive=drive)
    every = _eta_and_checkpoints(input, eta, number, None, False, rule, activation, backend)
    if backend == "reference":
        return plastic_linear_reference(input, weight, alpha, eta, hebb, bias, drive, rule, activation)
    output, hebb, *_ = plastic_op(input, weight, alpha, eta, hebb, bias, drive, None, None, None, False, rule,
                                    activation, every, None, None, None, True, backend)
    return output, hebb


def plastic_rnn(input, weight, alpha, eta, y0=None, hebb=None, modulation=None, clip=None, rule="hebb",
                activation="tanh", mod_weight=None, mod_bias=None, mod_fanout=None, mod_activation="tanh"):
    """A recurrent plastic layer (SPEC section 4): ``y_t = act((weight + alpha * H_t) y_{t-1} + input_t)``.

    ``input [T, B, N]``, ``weight [N, N]``, ``y0 [B, N]`` (zeros by default), ``clip`` an optional
    bound on the trace. Returns ``(output [T, B, N], hebb [B, N, N])``, the trace in `trace_dtype`
    (float32 for 16-bit inputs); ``hebb=`` takes that dtype or the input's.

    Neuromodulation (backpropamine) replaces the rule by ``H + M_t[j] post_j pre_i``, with M_t either

    * given: ``modulation [T, B]`` or ``[T, B, N]``, or
    * endogenous, computed inside each step from the new state by one modulator neuron:
      ``M_t[j] = mod_fanout[j] * mod_act(mod_weight . y_t + mod_bias)``, with ``mod_weight [N]``,
      ``mod_bias`` 0-d (default 0), ``mod_fanout [N]`` (default ones) and ``mod_activation``
      ``"tanh"`` (default) or ``"identity"``. All three get gradients.

    Under ``torch.autocast`` it computes as `plastic_linear` does.

    Under either form of neuromodulation ``eta`` is ignored, and it gets no gradient: ``eta.grad`` stays None (not a
    tensor of zeros), on every backend, as for any parameter a computation does not use (an
    optimizer's weight decay then leaves it alone, as it leaves an unused parameter).
    """
    number, eta = _eta_number(eta), _as_eta(eta, input)
    modulator = None if mod_weight is None else (mod_weight, mod_bias, mod_fanout, mod_activation)
    if mod_weight is None and (mod_bias is not None or mod_fanout is not None):
        raise ValueError("mod_weight: expected a tensor when mod_bias or mod_fanout is given, got None")
    backend, (input, weight, alpha, eta, y0, hebb, modulation, mod_weight, mod_bias, mod_fanout) = (
        _autocast.autocast_inputs(OP, _autocast.LOWER, input.device.type, input.dtype,
                                  (input, weight, alpha, eta, y0, hebb, modulation, mod_weight, mod_bias, mod_fanout),
                                  state_inputs=(5,)))
    modulator = None if mod_weight is None else (mod_weight, mod_bias, mod_fanout, mod_activation)
    _validate_plastic(input, weight, alpha, eta, hebb, recurrent=True, rule=rule, activation=activation, y0=y0,
                      modulation=modulation, clip=clip, modulator=modulator)
    clip = None if clip is None else float(clip)
    modulated = modulation is not None or mod_weight is not None
    every = _eta_and_checkpoints(input, eta, number, clip, modulated, rule, activation, backend)
    if modulated:
        eta = eta.detach()  # unused: no gradient (None, not zeros), the same on every backend
    if backend == "reference":
        return plastic_rnn_reference(input, weight, alpha, eta, y0, hebb, modulation, clip, rule, activation,
                                     mod_weight, mod_bias, mod_fanout, mod_activation)
    output, hebb, *_ = plastic_op(input, weight, alpha, eta, hebb, None, None, y0, modulation, clip, True, rule,
                                    activation, every, mod_weight, mod_bias, mod_fanout, mod_activation == "tanh",
                                    backend)
    return output, hebb
