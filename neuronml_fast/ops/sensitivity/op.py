"""Per-neuron first-order Taylor sensitivity (SPEC section 3).

    s[c] = | sum_k weight[c, k] * grad_weight[c, k] + bias[c] * grad_bias[c] |

Where things are (this folder):

* ``reference.py``: `neuron_sensitivity_reference`, the oracle.
* ``op.py`` (here): the custom op ``neuronml_fast::neuron_sensitivity`` with its fake, autograd
  and vmap rule, and the public function `neuron_sensitivity` (``nf.neuron_sensitivity``).
* launchers, one module per backend, each with ``neuron_sensitivity(weight, grad_weight, bias,
  grad_bias) -> (sensitivity, taylor)`` on ``[rows, cols]`` views with a contiguous inner
  dimension: ``cpu.py`` (csrc/cpu/sensitivity.cpp), ``triton.py`` (kernels/sensitivity.py),
  ``cuda.py`` (csrc/cuda/sensitivity.cu).

Output dtype: the accumulation dtype, float64 for float64 inputs and float32 otherwise, so a
bf16/fp16 model gets a float32 sensitivity (documented in the README, pinned by a test).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from ... import _alloc, _checks, backends
from .. import _autocast
from .._vmap import merge_batch
from .reference import neuron_sensitivity_reference

OP = "neuron_sensitivity"

backends.register_op(OP, family="sensitivity")


def _validate(weight, grad_weight, bias, grad_bias):
    _checks.floating_tensor("weight", weight, min_ndim=2)
    _checks.like("grad_weight", grad_weight, "weight", weight)
    _checks.both_or_neither("bias", bias, "grad_bias", grad_bias)
    if bias is not None:
        _checks.like("bias", bias, "weight", weight, shape=weight.shape[:1])
        _checks.like("grad_bias", grad_bias, "weight", weight, shape=weight.shape[:1])


def _as_rows(weight, grad_weight):
    """[C, ...] -> [C, K] with a contiguous inner dimension, without copying where possible.

    The sum over k is order-free, so the inner dims are taken in the order of weight's strides:
    a channels-last conv weight flattens as a view. Both tensors use the same order.
    """
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    if weight.is_contiguous() and grad_weight.is_contiguous():
        return weight.view(rows, cols), grad_weight.view(rows, cols)
    if weight.dim() > 2:
        order = sorted(range(1, weight.dim()), key=lambda d: -weight.stride(d))
        weight, grad_weight = weight.permute(0, *order), grad_weight.permute(0, *order)

    def flat(t):
        t = t.reshape(rows, cols)
        return t.contiguous() if cols > 1 and t.stride(1) != 1 else t

    return flat(weight), flat(grad_weight)


# --------------------------------------------------------------------------------------------
# Custom op: schema, kernel call, fake implementation, autograd, vmap.


@torch.library.custom_op("neuronml_fast::neuron_sensitivity", mutates_args=())
def neuron_sensitivity_op(
    weight: Tensor, grad_weight: Tensor, bias: Optional[Tensor], grad_bias: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    """Returns (sensitivity, taylor): |Taylor sum| and the signed sum the backward needs."""
    weight_rows, grad_rows = _as_rows(weight, grad_weight)
    return backends.launchers(OP, backend).neuron_sensitivity(weight_rows, grad_rows, bias, grad_bias)


def new_outputs(weight):
    """Uninitialized (sensitivity, taylor) [rows] in the accumulation dtype, for the launchers."""
    acc = _alloc.accumulation_dtype(weight.dtype)
    return (_alloc.empty(weight.shape[:1], dtype=acc, device=weight.device),
            _alloc.empty(weight.shape[:1], dtype=acc, device=weight.device))


@neuron_sensitivity_op.register_fake
def _(weight, grad_weight, bias, grad_bias, backend):
    acc = _alloc.accumulation_dtype(weight.dtype)
    return weight.new_empty(weight.shape[:1], dtype=acc), weight.new_empty(weight.shape[:1], dtype=acc)


def _setup_context(ctx, inputs, output):
    weight, grad_weight, bias, grad_bias, _backend = inputs
    ctx.save_for_backward(weight, grad_weight, bias, grad_bias, output[1])


def _backward(ctx, grad_sensitivity, grad_taylor):
    # d|r|/dr = sign(r) (0 at r = 0, as torch.abs); r is bilinear in (w, g) and (b, gb).
    # Written in differentiable torch ops, so double backward comes for free.
    weight, grad_weight, bias, grad_bias, taylor = ctx.saved_tensors
    coeff = grad_sensitivity * taylor.sign() + grad_taylor
    per_row = coeff.view(-1, *([1] * (weight.dim() - 1)))
    d_weight = (per_row * grad_weight).to(weight.dtype)
    d_grad_weight = (per_row * weight).to(weight.dtype)
    d_bias = d_grad_bias = None
    if bias is not None:
        d_bias, d_grad_bias = (coeff * grad_bias).to(bias.dtype), (coeff * bias).to(bias.dtype)
    return d_weight, d_grad_weight, d_bias, d_grad_bias, None


neuron_sensitivity_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(neuron_sensitivity_op, OP, _autocast.Policy(_autocast.FP32))


@neuron_sensitivity_op.register_vmap
def _vmap(info, in_dims, weight, grad_weight, bias, grad_bias, backend):
    # A batch of layers is one taller layer: merge the vmapped dim into the neuron dim.
    batch = info.batch_size
    w_dim, g_dim, b_dim, gb_dim, _ = in_dims
    sensitivity, taylor = neuron_sensitivity_op(
        merge_batch(weight, w_dim, batch), merge_batch(grad_weight, g_dim, batch), merge_batch(bias, b_dim, batch),
        merge_batch(grad_bias, gb_dim, batch), backend
    )
    return (sensitivity.view(batch, -1), taylor.view(batch, -1)), (0, 0)


# --------------------------------------------------------------------------------------------
# Public function.


def neuron_sensitivity(weight, grad_weight, bias=None, grad_bias=None):
    """Per-neuron first-order Taylor importance ``|sum_k w*dL/dw + b*dL/db|`` (SPEC section 3).

    Args:
        weight: ``[C_out, ...]`` parameter of any rank >= 2 (conv or linear weight).
        grad_weight: its gradient, same shape, dtype and device.
        bias, grad_bias: optional ``[C_out]`` bias and its gradient (both or neither).

    Returns:
        ``[C_out]`` tensor, float64 for float64 inputs and float32 otherwise. Differentiable
        (twice) with respect to every input. Under ``torch.autocast`` the inputs are taken in
        float32, as CUDA autocast takes ``sum`` and ``norm`` (`neuronml_fast.ops._autocast`).
    """
    _checks.floating_tensor("weight", weight)
    backend, (weight, grad_weight, bias, grad_bias) = _autocast.autocast_inputs(
        OP, _autocast.FP32, weight.device.type, weight.dtype, (weight, grad_weight, bias, grad_bias))
    _validate(weight, grad_weight, bias, grad_bias)
    if backend == "reference":
        return neuron_sensitivity_reference(weight, grad_weight, bias, grad_bias)
    return neuron_sensitivity_op(weight, grad_weight, bias, grad_bias, backend)[0]
