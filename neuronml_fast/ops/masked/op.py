"""Masked (structure-gated) conv2d and linear: NeuronML's flexible structure (SPEC section 2).

    out[n, c, ...] = mask[c] * ((input * weight)[n, c, ...] + bias[c])

Single-task or task-batched (each task its own weight, bias and mask, one call for all).
``skip_zero=True``: a neuron whose mask is exactly 0 is pruned: not computed, output exactly 0,
all its gradients exactly 0.

Where things are (this folder):

* ``reference.py``: `masked_conv2d_reference`, `masked_linear_reference`, the oracle.
* ``op.py`` (here): argument checks, the custom ops ``neuronml_fast::masked_conv2d`` /
  ``masked_linear`` returning ``(out, pre)`` (``pre = conv + bias``, what the mask gradient
  needs) and ``..._backward`` returning ``(grad_input, grad_weight, grad_bias, grad_mask)``, always
  task-batched (``[T, N, ...]``; a single task is T = 1); their fakes, autograd and vmap rules;
  the public functions `masked_conv2d`, `masked_linear` (exported as ``nf.masked_conv2d`` ...).
* launchers, one module per backend, each with the four functions below (``MaskedLaunchers``):
  ``cpu.py`` (ATen/oneDNN dense core on the compacted active neurons, fused C++ epilogue and
  prologue: csrc/cpu/masked.cpp); ``gpu.py``, the driver the GPU backends share, with its
  kernels in ``triton.py`` (kernels/masked.py) and ``cuda.py`` (csrc/cuda/masked.cu).

The backward is one fused op; its own derivative is written with the forward and backward ops
again (all of it is bilinear), so every order of differentiation runs on the kernels (MAML's
second order included). A vmapped dimension merges into the task dimension: vmap over tasks is
task batching.
"""

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import _checks, backends
from .. import _autocast
from .._functorch import TransformableOp
from .._vmap import merge_batch
from .reference import conv_output_hw, conv_output_shape, masked_conv2d_reference, masked_linear_reference

CONV, LINEAR = "masked_conv2d", "masked_linear"

for _op in (CONV, f"{CONV}_backward", LINEAR, f"{LINEAR}_backward"):
    backends.register_op(_op, family="masked")


class MaskedLaunchers(Protocol):
    """What a backend's launcher module provides; tensors in the custom ops' task-batched form
    (x [T, N, C_in, ...], weight [T, C_out, ...], mask and bias [T, C_out])."""

    def conv2d_forward(self, x, weight, mask, bias, stride, padding, dilation, groups, skip_zero,
                       contiguous_output): ...  # -> (out, pre)

    def conv2d_backward(self, grad_out, grad_pre, x, weight, mask, pre, stride, padding, dilation, groups,
                        skip_zero, need_input_grad, need_weight_grad,
                        contiguous_input_grad): ...  # -> (grad_input, grad_weight, grad_bias, grad_mask)

    def linear_forward(self, x, weight, mask, bias, skip_zero): ...

    def linear_backward(self, grad_out, grad_pre, x, weight, mask, pre, skip_zero, need_input_grad,
                        need_weight_grad): ...

    # Optional: ``conv2d_layout``, a `ContiguousConvLayout` for a backend whose kernels keep
    # activations in a layout of their own.


class ContiguousConvLayout:
    """The layout protocol of a masked conv2d backend, and its default: the kernels take the
    caller's tensors and write contiguous outputs and gradients. A backend whose kernels keep
    activations in a layout of their own gives its launcher module a ``conv2d_layout`` object
    with these four methods (the CPU backend: grouped NHWC, `cpu.GroupedNHWCLayout`)."""

    def prepare(self, input, channels_last):
        """``(input for the kernels, contiguous_input_grad, contiguous_output)`` for a ``[T, N, C, H, W]``
        input: whether the input gradient and the outputs come back contiguous. ``channels_last``:
        None for a task-batched call (any layout the backend likes), else whether torch's conv2d
        would give this single-task call channels_last results (`_conv_channels_last`); the
        public function lays out the outputs, this the input gradient."""
        if channels_last and _has_memory_format(input):
            input = _InputGradChannelsLast.apply(input)
        return input, True, True

    def fake_outputs(self, shape, input, contiguous_output):
        """Empty ``(out, pre)`` of ``shape`` laid out as the forward kernel lays them out."""
        return input.new_empty(shape), input.new_empty(shape)

    def fake_input_grad(self, input, contiguous_input_grad):
        return input.new_empty(input.shape)

    def fake_weight_grad(self, weight):
        return weight.new_empty(weight.shape)


_CONTIGUOUS = ContiguousConvLayout()


def _layout(backend):
    return getattr(backends.launchers(CONV, backend), "conv2d_layout", _CONTIGUOUS)


# ---- argument checks -----------------------------------------------------------------------
# The forms nn.Conv2d and F.conv2d take: an int or a pair (a one-element sequence too) for
# stride, padding and dilation, string padding "same" / "valid", and unbatched [C_in, H, W] inputs.
# Shape errors are `_checks.ArgumentError`s: ValueErrors that are also the RuntimeError torch
# raises for the same input.

ArgumentError = _checks.ArgumentError


def _pair(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, torch.Size)):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return [int(v) for v in pair]


def _string_padding(padding, weight, stride, dilation):
    """(padding pair, extra right/bottom zeros [H, W] or None) of "same" / "valid", as torch pads:
    "same" splits the dilated kernel's span evenly and, for an even span, pads one more zero
    after the input."""
    if padding == "valid":
        return [0, 0], None
    if padding != "same":
        raise ArgumentError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
    if stride != [1, 1]:
        raise ArgumentError(f"padding: 'same' is not supported for strided convolutions, got stride {stride}")
    span = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:])]
    left = [s // 2 for s in span]
    extra = [s - 2 * l for s, l in zip(span, left)]
    return left, (extra if any(extra) else None)


def _check_mask_and_bias(mask, bias, ref, shape):
    _checks.like("mask", mask, "input", ref, shape=shape)
    if bias is not None:
        _checks.like("bias", bias, "input", ref, shape=shape)


def _check_conv_shapes(input, weight):
    """input [N, C_in, H, W] with weight [C_out, C_in/groups, kH, kW], or the task-batched
    [T, N, C_in, H, W] with [T, C_out, C_in/groups, kH, kW]. Returns whether it is task-batched."""
    _checks.floating_tensor("weight", weight)
    if weight.dim() == 4 and input.dim() != 4:
        raise ArgumentError(
            f"input: expected [N, C_in, H, W] or unbatched [C_in, H, W] for a weight of shape {list(weight.shape)}, "
            f"got shape {list(input.shape)}"
            + (" (a 5-d input is the task-batched form [T, N, C_in, H, W], which takes a task-batched weight "
               "[T, C_out, C_in/groups, kH, kW])" if input.dim() == 5 else ""))
    if weight.dim() == 5 and input.dim() != 5:
        raise ArgumentError(f"input: expected task-batched [T, N, C_in, H, W] for a task-batched weight of shape "
                            f"{list(weight.shape)}, got shape {list(input.shape)}")
    if weight.dim() not in (4, 5):
        raise ArgumentError(f"weight: expected [C_out, C_in/groups, kH, kW] or task-batched "
                            f"[T, C_out, C_in/groups, kH, kW], got shape {list(weight.shape)}")
    _checks.like("input", input, "weight", weight, shape=input.shape)
    batched = input.dim() == 5
    if batched and weight.shape[0] != input.shape[0]:
        raise ArgumentError(f"weight: expected {input.shape[0]} tasks (input.shape[0]), got {weight.shape[0]}")
    return batched


def _validate_conv(input, weight, mask, bias, stride, padding, dilation, groups):
    """Returns (batched, stride, padding, dilation, extra zero padding after the input or None)."""
    batched = _check_conv_shapes(input, weight)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ArgumentError(f"groups: expected a positive int, got {groups!r}")
    c_out, c_in_per_group = weight.shape[-4], weight.shape[-3]
    if c_in_per_group * groups != input.shape[-3]:
        raise ArgumentError(f"input: expected {c_in_per_group * groups} channels (weight.shape[-3] x groups = "
                            f"{c_in_per_group} x {groups}), got {input.shape[-3]} channels in input of shape "
                            f"{list(input.shape)}")
    if c_out % groups:
        raise ArgumentError(f"weight: expected C_out divisible by groups={groups}, got C_out={c_out}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ArgumentError(f"stride, dilation: expected stride >= 1 and dilation >= 1, got {stride}, {dilation}")
    extra = None
    if isinstance(padding, str):
        padding, extra = _string_padding(padding, weight, stride, dilation)
    else:
        padding = _pair(padding, "padding")
        if min(padding) < 0:
            raise ArgumentError(f"padding: expected padding >= 0, got {padding}")
    padded = [s + e for s, e in zip(input.shape[-2:], extra or (0, 0))]
    out_hw = conv_output_hw(padded, weight.shape[-2:], stride, padding, dilation)
    if min(out_hw) < 1:
        raise ArgumentError(f"input: spatial size {list(input.shape[-2:])} with padding {padding} is smaller than "
                            f"the dilated kernel {list(weight.shape[-2:])} (dilation {dilation})")
    _check_mask_and_bias(mask, bias, input, weight.shape[:-3])
    return batched, stride, padding, dilation, extra


def _validate_linear(input, weight, mask, bias):
    _checks.floating_tensor("input", input, min_ndim=1)
    _checks.floating_tensor("weight", weight)
    if weight.dim() not in (2, 3):
        raise ArgumentError(f"weight: expected [out, in] or task-batched [T, out, in], got shape "
                            f"{list(weight.shape)}")
    _checks.like("input", input, "weight", weight, shape=input.shape)
    batched = weight.dim() == 3
    if batched and (input.dim() < 2 or input.shape[0] != weight.shape[0]):
        raise ArgumentError(f"input: expected [T={weight.shape[0]}, ..., in] for a task-batched weight, "
                            f"got shape {list(input.shape)}")
    if input.shape[-1] != weight.shape[-1]:
        raise ArgumentError(f"input: expected {weight.shape[-1]} features in the last dimension (weight.shape[-1]), "
                            f"got shape {list(input.shape)}")
    _check_mask_and_bias(mask, bias, input, weight.shape[:-1])
    return batched


# ---- memory format -------------------------------------------------------------------------


def _suggests_channels_last(t):
    """c10's ``suggest_memory_format`` of a 4-d tensor (``is_channels_last_strides_2d``): whether
    its strides read as channels_last, with torch's tie-breaks for size-1 dimensions (an
    [N, 1, H, W] or [N, C, 1, 1] tensor is contiguous unless its strides say otherwise)."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def _conv_channels_last(input, weight):
    """Whether torch's conv2d gives this single-task call a channels_last output and input gradient
    (ATen's ``_determine_backend_memory_format``): where the input's or the weight's strides
    suggest channels_last, except for float64 on CUDA (cuDNN then works in NCHW)."""
    if input.device.type == "cuda" and input.dtype == torch.float64:
        return False
    return _suggests_channels_last(input) or _suggests_channels_last(weight)


def _has_memory_format(t):
    """False inside vmap and the torch.func transforms, whose tensors have no memory format."""
    return torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(t)


class _InputGradChannelsLast(torch.autograd.Function):
    """Identity whose backward lays a [T, N, C, H, W] input gradient out as [T, N, H, W, C]: for a
    backend whose kernels write contiguous gradients, the channels_last input gradient torch's
    conv2d gives (a view when it already is)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


# ---- custom ops ----------------------------------------------------------------------------


def _empty_grad(t):
    return t.new_empty((0,))


@torch.library.custom_op("neuronml_fast::masked_conv2d", mutates_args=())
def masked_conv2d_op(
    input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
    dilation: list[int], groups: int, contiguous_input_grad: bool, contiguous_output: bool, skip_zero: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Task-batched forward: (out, pre), both [T, N, C_out, H_out, W_out].

    ``contiguous_input_grad`` is for the backward (autograd passes it on): the input gradient
    comes out contiguous, in the layout of the caller's own input, even where ``input`` here is
    a backend layout's copy of it; autograd then adds it into ``input.grad`` without a
    transposing pass. ``contiguous_output``: whether the outputs come back contiguous (as
    PyTorch's conv2d returns them for a single-task input that is not channels_last) rather than in
    the backend's own layout. Both come from the backend's layout (`ContiguousConvLayout`).
    """
    return backends.launchers(CONV, backend).conv2d_forward(input, weight, mask, bias, stride, padding, dilation,
                                                            groups, skip_zero, contiguous_output)


@masked_conv2d_op.register_fake
def _(input, weight, mask, bias, stride, padding, dilation, groups, contiguous_input_grad, contiguous_output,
      skip_zero, backend):
    shape = conv_output_shape(input, weight, stride, padding, dilation)
    return _layout(backend).fake_outputs(shape, input, contiguous_output)


@torch.library.custom_op("neuronml_fast::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward_op(
    grad_out: Tensor, grad_pre: Optional[Tensor], input: Tensor, weight: Tensor, mask: Tensor, pre: Optional[Tensor],
    stride: list[int], padding: list[int], dilation: list[int], groups: int, contiguous_input_grad: bool,
    skip_zero: bool, need_input_grad: bool, need_weight_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_mask); a grad not needed is an empty tensor,
    grad_mask is 0 when ``pre`` is None. grad_input is contiguous if ``contiguous_input_grad``,
    else in the backend's layout (`ContiguousConvLayout`)."""
    return backends.launchers(CONV, backend).conv2d_backward(
        grad_out, grad_pre, input, weight, mask, pre, stride, padding, dilation, groups, skip_zero,
        need_input_grad, need_weight_grad, contiguous_input_grad)


@masked_conv2d_backward_op.register_fake
def _(grad_out, grad_pre, input, weight, mask, pre, stride, padding, dilation, groups, contiguous_input_grad,
      skip_zero, need_input_grad, need_weight_grad, backend):
    layout = _layout(backend)
    return (layout.fake_input_grad(input, contiguous_input_grad) if need_input_grad else _empty_grad(input),
            layout.fake_weight_grad(weight) if need_weight_grad else _empty_grad(weight),
            mask.new_empty(mask.shape), mask.new_empty(mask.shape))


@torch.library.custom_op("neuronml_fast::masked_linear", mutates_args=())
def masked_linear_op(
    input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor], skip_zero: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """Task-batched forward: (out, pre), both [T, N, out]."""
    return backends.launchers(LINEAR, backend).linear_forward(input, weight, mask, bias, skip_zero)


@masked_linear_op.register_fake
def _(input, weight, mask, bias, skip_zero, backend):
    shape = (*input.shape[:-1], weight.shape[1])
    return input.new_empty(shape), input.new_empty(shape)


@torch.library.custom_op("neuronml_fast::masked_linear_backward", mutates_args=())
def masked_linear_backward_op(
    grad_out: Tensor, grad_pre: Optional[Tensor], input: Tensor, weight: Tensor, mask: Tensor, pre: Optional[Tensor],
    skip_zero: bool, need_input_grad: bool, need_weight_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.launchers(LINEAR, backend).linear_backward(
        grad_out, grad_pre, input, weight, mask, pre, skip_zero, need_input_grad, need_weight_grad)


@masked_linear_backward_op.register_fake
def _(grad_out, grad_pre, input, weight, mask, pre, skip_zero, need_input_grad, need_weight_grad, backend):
    return (input.new_empty(input.shape) if need_input_grad else _empty_grad(input),
            weight.new_empty(weight.shape) if need_weight_grad else _empty_grad(weight),
            mask.new_empty(mask.shape), mask.new_empty(mask.shape))


# ---- autograd ------------------------------------------------------------------------------
# The forward op's inputs are (input, weight, mask, bias, *layer_args, *forward_only_args, skip_zero,
# backend), its backward op's (grad_out, grad_pre, input, weight, mask, pre, *layer_args, skip_zero,
# need_input_grad, need_weight_grad, backend); layer_args are (stride, padding, dilation, groups,
# contiguous_input_grad) for conv and () for linear, forward_only_args (contiguous_output,) for conv.
# One set of autograd functions serves both layers.


class _OpPair:
    """A masked layer's forward and backward custom ops, called with the argument order of the
    comment above: one set of autograd functions serves the conv and the linear layer.
    ``forward_op`` and ``backward_op`` are set by `_register` (`TransformableOp`s)."""

    def __init__(self, n_layer_args, forward_only_args=()):
        self.n_layer_args = n_layer_args
        # Arguments of the forward op alone, after layer_args: their values for the forward calls
        # of the double backward (where they change layouts, never values).
        self.forward_only_args = forward_only_args

    def forward(self, x, w, m, b, layer_args, skip_zero, backend):
        return self.forward_op(x, w, m, b, *layer_args, *self.forward_only_args, skip_zero, backend)

    def backward(self, go, gp, x, w, m, pre, layer_args, skip_zero, need_x, need_w, backend):
        return self.backward_op(go, gp, x, w, m, pre, *layer_args, skip_zero, need_x, need_w, backend)


def _channel_view(t, like):
    """[T, C] -> [T, 1, C, 1, ...] broadcasting against a [T, N, C, ...] tensor."""
    return t.view(t.shape[0], 1, t.shape[1], *([1] * (like.dim() - 3)))


def _channel_sum(t):
    """[T, N, C, ...] -> [T, C]."""
    return t.sum(dim=[1, *range(3, t.dim())])


def _make_forward_autograd(layer):
    def setup_context(ctx, inputs, output):
        x, w, m, b = inputs[:4]
        ctx.layer_args = inputs[4:4 + layer.n_layer_args]
        ctx.skip_zero, ctx.backend = inputs[-2], inputs[-1]
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w, m, output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_pre):
        x, w, m, pre = ctx.saved_tensors
        n_args = 4 + layer.n_layer_args + len(layer.forward_only_args) + 2
        if grad_out is None and grad_pre is None:
            return (None,) * n_args
        if grad_out is None:
            grad_out = torch.zeros_like(pre)
        need_x, need_w, need_m = ctx.needs_input_grad[:3]
        gx, gw, gb, gm = layer.backward(grad_out, grad_pre, x, w, m, pre if need_m else None, ctx.layer_args,
                                        ctx.skip_zero, need_x, need_w, ctx.backend)
        return (gx if need_x else None, gw if need_w else None, gm if need_m else None,
                gb if ctx.has_bias else None) + (None,) * (n_args - 4)

    return setup_context, backward


def _make_backward_autograd(layer):
    # d(backward)/d(inputs), from  gy = (go*m + gp)*keep,  gx = convT(gy, w),  gw = corr(x, gy),
    # gb = sum gy,  gm = keep * sum go*pre  (keep = mask != 0 under skip_zero, else 1).
    def setup_context(ctx, inputs, output):
        go, gp, x, w, m, pre = inputs[:6]
        ctx.layer_args = inputs[6:6 + layer.n_layer_args]
        ctx.skip_zero, ctx.backend = inputs[-4], inputs[-1]
        ctx.has_gp, ctx.has_pre = gp is not None, pre is not None
        ctx.save_for_backward(go, gp, x, w, m, pre)
        ctx.set_materialize_grads(False)

    def backward(ctx, ggx, ggw, ggb, ggm):
        go, gp, x, w, m, pre = ctx.saved_tensors
        ggx = ggx if ggx is not None and ggx.numel() else None
        ggw = ggw if ggw is not None and ggw.numel() else None
        keep = (m != 0).to(m.dtype) if ctx.skip_zero else torch.ones_like(m)
        keep_b = _channel_view(keep, go)
        args = (ctx.layer_args, True, ctx.backend)

        g_gy = None  # gradient reaching gy
        if ggx is not None:
            g_gy = layer.forward(ggx, w, keep, None, *args)[1]
        if ggw is not None:
            term = layer.forward(x, ggw, keep, None, *args)[1]
            g_gy = term if g_gy is None else g_gy + term
        if ggb is not None:
            term = _channel_view(ggb * keep, go)
            g_gy = term.expand_as(go) if g_gy is None else g_gy + term

        g_x = g_w = None
        want_x = ggw is not None and ctx.needs_input_grad[2]
        want_w = ggx is not None and ctx.needs_input_grad[3]
        if want_x or want_w:
            # The backward op forms gy = keep * (go * m + gp) itself, in its fused prologue.
            gx2, gw2, _, _ = layer.backward(go, gp, ggx if ggx is not None else x, ggw if ggw is not None else w,
                                            m, None, ctx.layer_args, ctx.skip_zero, want_x, want_w, ctx.backend)
            g_x = gx2 if want_x else None
            g_w = gw2 if want_w else None

        # Only what autograd asks for: in MAML the mask is a constant, so its terms (a pass over
        # the activations each) are skipped.
        need_go, need_gp, _, _, need_m, need_pre = ctx.needs_input_grad[:6]
        g_go = g_gp = g_m = g_pre = None
        if g_gy is not None:
            g_go = g_gy * _channel_view(m * keep, go) if need_go else None
            g_gp = g_gy * keep_b if (ctx.has_gp and need_gp) else None
            g_m = keep * _channel_sum(g_gy * go) if need_m else None
        if ggm is not None and ctx.has_pre:
            ggm_b = _channel_view(ggm * keep, go)
            if need_go:
                g_go = ggm_b * pre if g_go is None else g_go + ggm_b * pre
            g_pre = ggm_b * go if need_pre else None
        return (g_go, g_gp, g_x, g_w, g_m, g_pre) + (None,) * (layer.n_layer_args + 4)

    return setup_context, backward


def _merge_into_tasks(n_tensors):
    """The vmap rule of ``op`` (a `TransformableOp`, given by its constructor): the vmapped dim joins
    the task dim (dim 0) of the first n_tensors args."""

    def rule_for(op):
        def rule(info, in_dims, *args):
            batch = info.batch_size
            merged = [merge_batch(a, d, batch) for a, d in zip(args[:n_tensors], in_dims[:n_tensors])]
            merged += list(args[n_tensors:])
            outs = op(*merged)
            results, dims = [], []
            for o in outs:
                if o.dim() == 1 and o.numel() == 0:  # a gradient that was not asked for
                    results.append(o)
                    dims.append(None)
                else:
                    results.append(o.unflatten(0, (batch, -1)))
                    dims.append(0)
            return tuple(results), tuple(dims)

        return rule

    return rule_for


def _register(layer, forward_op, backward_op):
    """Autograd and vmap for a layer's pair of ops, and the callables the layer calls them through."""
    layer.forward_op = TransformableOp(forward_op, *_make_forward_autograd(layer), _merge_into_tasks(4))
    layer.backward_op = TransformableOp(backward_op, *_make_backward_autograd(layer), _merge_into_tasks(6))
    return layer


_CONV_LAYER = _register(_OpPair(5, forward_only_args=(False,)), masked_conv2d_op, masked_conv2d_backward_op)
_LINEAR_LAYER = _register(_OpPair(0), masked_linear_op, masked_linear_backward_op)
for _op_def, _name, _policy in ((masked_conv2d_op, CONV, _autocast.Policy(_autocast.LOWER, cast_outputs=(0, 1))),
                                (masked_linear_op, LINEAR, _autocast.Policy(_autocast.LOWER, cast_outputs=(0, 1))),
                                (masked_conv2d_backward_op, f"{CONV}_backward", _autocast.Policy(_autocast.AS_GIVEN)),
                                (masked_linear_backward_op, f"{LINEAR}_backward", _autocast.Policy(_autocast.AS_GIVEN))):
    _autocast.register(_op_def, _name, _policy)


# ---- public functions ----------------------------------------------------------------------


def masked_conv2d(input, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1, skip_zero=True):
    """Structure-gated 2-d convolution (SPEC section 2): ``mask[c] * (conv(input, weight)[c] + bias[c])``.

    Single task: ``input [N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``), ``weight [C_out,
    C_in/groups, kH, kW]``, ``mask`` and ``bias [C_out]``. Task-batched: a leading ``T`` on all
    four; every task runs with its own parameters in one call. ``stride``, ``padding`` and
    ``dilation`` as in ``F.conv2d`` (``padding="same"`` or ``"valid"`` too). With ``skip_zero``
    (default) neurons whose mask is exactly 0 are not computed; their outputs and gradients are
    exactly 0. A single-task output (and input gradient) is channels_last or contiguous as torch's
    conv2d would return it; under ``torch.autocast`` the call computes as conv2d does (inputs
    and output in the autocast dtype; see `neuronml_fast.ops._autocast`).
    """
    _checks.floating_tensor("input", input)
    backend, (input, weight, mask, bias) = _autocast.autocast_inputs(
        CONV, _autocast.LOWER, input.device.type, input.dtype, (input, weight, mask, bias))
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    batched, stride, padding, dilation, extra = _validate_conv(input, weight, mask, bias, stride, padding, dilation,
                                                               groups)
    if extra is not None:  # "same" padding of an even kernel span: the one more zero goes after the input
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    if backend == "reference":
        out = masked_conv2d_reference(input, weight, mask, bias, stride, padding, dilation, groups, skip_zero)
    elif batched:
        out = _masked_conv2d_tasks(input, weight, mask, bias, stride, padding, dilation, groups, skip_zero, backend)
    else:
        out = _masked_conv2d_single(input, weight, mask, bias, stride, padding, dilation, groups, skip_zero, backend)
    return out.squeeze(0) if unbatched else out


def _masked_conv2d_tasks(input, weight, mask, bias, stride, padding, dilation, groups, skip_zero, backend,
                         channels_last=None):
    """The custom op on [T, ...] tensors; ``channels_last`` as `ContiguousConvLayout.prepare` takes it.
    A backend that convolves in a layout of its own converts the input here, so that autograd keeps
    the converted input for the backward, whose input gradient comes back in the caller's layout."""
    input, contiguous_input_grad, contiguous_output = _layout(backend).prepare(input, channels_last)
    return _CONV_LAYER.forward_op(input, weight, mask, bias, stride, padding, dilation, groups, contiguous_input_grad,
                                  contiguous_output, skip_zero, backend)[0]


def _masked_conv2d_single(input, weight, mask, bias, stride, padding, dilation, groups, skip_zero, backend):
    """One task: the task-batched op with T = 1, its output in the memory format torch's conv2d
    gives this input and weight (a view where the backend wrote it so)."""
    channels_last = _conv_channels_last(input, weight)
    out = _masked_conv2d_tasks(input.unsqueeze(0), weight.unsqueeze(0), mask.unsqueeze(0),
                               None if bias is None else bias.unsqueeze(0), stride, padding, dilation, groups,
                               skip_zero, backend, channels_last).squeeze(0)
    return _in_memory_format(out, channels_last) if _has_memory_format(out) else out


def _in_memory_format(t, channels_last):
    """The 4-d ``t`` with the canonical strides of its memory format, as torch's ops allocate them:
    a view where it is already laid out so (``contiguous(memory_format=...)`` keeps the strides of
    size-1 dimensions as they are), else one copy."""
    n, c, h, w = t.shape
    canonical = (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    if t.stride() == canonical:
        return t
    laid_out = t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return laid_out if laid_out.stride() == canonical else laid_out.as_strided(t.shape, canonical)


def masked_linear(input, weight, mask, bias=None, skip_zero=True):
    """Structure-gated linear layer (SPEC section 2): ``mask[c] * (input @ weight[c] + bias[c])``.

    Single task: ``input [..., in]``, ``weight [out, in]``, ``mask`` and ``bias [out]``.
    Task-batched: ``input [T, ..., in]``, ``weight [T, out, in]``, ``mask`` and ``bias [T, out]``.
    Under ``torch.autocast`` it computes as ``F.linear`` does (see `neuronml_fast.ops._autocast`).
    """
    _checks.floating_tensor("input", input, min_ndim=1)
    backend, (input, weight, mask, bias) = _autocast.autocast_inputs(
        LINEAR, _autocast.LOWER, input.device.type, input.dtype, (input, weight, mask, bias))
    batched = _validate_linear(input, weight, mask, bias)
    if backend == "reference":
        return masked_linear_reference(input, weight, mask, bias, skip_zero)
    if not batched:
        input, weight, mask = input.unsqueeze(0), weight.unsqueeze(0), mask.unsqueeze(0)
        bias = None if bias is None else bias.unsqueeze(0)
    tasks, lead = input.shape[0], input.shape[1:-1]
    rows = math.prod(lead)
    out = _LINEAR_LAYER.forward_op(input.reshape(tasks, rows, input.shape[-1]), weight, mask, bias, skip_zero,
                                   backend)[0]
    out = out.view(tasks, *lead, weight.shape[1])
    return out if batched else out.squeeze(0)
