"""Batch normalization over the rows of a matrix, with a fused double backward.

    y = weight * (x - mean) * invstd + bias,   mean and invstd over the rows of x [R, C]

This is MAML's transductive BatchNorm (batch statistics, no running statistics) in the form the
CPU backend stores its activations: a task-batched ``[T, N, C, H, W]`` activation in grouped
NHWC is the ``[N*H*W, T*C]`` matrix, so one call normalizes every (task, channel) pair.

The forward and the backward are ATen's fused ``native_batch_norm`` and
``native_batch_norm_backward``. The double backward, where MAML's second order spends its BN
time (it differentiates the inner step's BN backward), is one two-pass kernel instead of the
~25 full-size ops autograd composes it from.

Where things are (this folder):

* ``reference.py``: `batch_norm_rows_double_backward_reference` (the closed form in plain torch
  ops), the oracle; the tests also check it against autograd's double backward of ``F.batch_norm``.
* ``op.py`` (here): the custom op ``neuronml_fast::batch_norm_rows_double_backward`` and its
  fake; autograd: `_BatchNormRows` (forward) and `_BatchNormRowsBackward` (its backward, whose own
  backward is the double-backward op; a third derivative raises); the public function
  `batch_norm_rows`.
* ``cpu.py`` and ``triton.py``, the launchers ``batch_norm_rows_double_backward``
  (csrc/cpu/batch_norm.cpp; kernels/batch_norm.py: two launches, per-column sums over chunks of
  rows, then the element-wise pass). No CUDA C++ kernel: ``auto`` runs the Triton one on a GPU.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ... import _checks, backends
from .. import _autocast
from .reference import batch_norm_rows_double_backward_reference

OP = "batch_norm_rows_double_backward"

backends.register_op(OP, family="batch_norm")


@torch.library.custom_op("neuronml_fast::batch_norm_rows_double_backward", mutates_args=())
def batch_norm_rows_double_backward_op(
    u: Optional[Tensor], u_gamma: Optional[Tensor], u_beta: Optional[Tensor], grad_out: Tensor, input: Tensor,
    weight: Tensor, mean: Tensor, invstd: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d grad_out, d input, d weight); see `batch_norm_rows_double_backward_reference`."""
    return backends.launchers(OP, backend).batch_norm_rows_double_backward(u, u_gamma, u_beta, grad_out, input,
                                                                            weight, mean, invstd)


@batch_norm_rows_double_backward_op.register_fake
def _(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd, backend):
    return input.new_empty(input.shape), input.new_empty(input.shape), weight.new_empty(weight.shape)


_autocast.register(batch_norm_rows_double_backward_op, OP, _autocast.Policy(_autocast.AS_GIVEN))


def _check_double_backward(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd):
    _checks.floating_tensor("input", input, ndim=2)
    _checks.like("grad_out", grad_out, "input", input)
    if u is not None:
        _checks.like("u", u, "input", input)
    channels = (input.shape[1],)
    _checks.like("weight", weight, "input", input, shape=channels)
    # batch norm keeps the statistics of a 16-bit input in float32
    statistics = {input.dtype: "the input's", torch.float32: "float32 statistics"}
    for name, value in (("mean", mean), ("invstd", invstd)):
        _checks.like_in_dtypes(name, value, "input", input, statistics, shape=channels)
    for name, value in (("u_gamma", u_gamma), ("u_beta", u_beta)):
        if value is not None:
            _checks.like(name, value, "input", input, shape=channels)


def batch_norm_rows_double_backward(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd):
    """(d grad_out, d input, d weight); see `batch_norm_rows_double_backward_reference`."""
    _check_double_backward(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd)
    backend = backends.resolve(OP, input.device.type, input.dtype)
    if backend == "reference":
        return batch_norm_rows_double_backward_reference(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd)
    return batch_norm_rows_double_backward_op(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd, backend)


class _BatchNormRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, eps):
        out, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, invstd = ctx.saved_tensors
        d_input, d_weight, d_bias = _BatchNormRowsBackward.apply(grad_out, input, weight, mean, invstd, ctx.eps)
        return d_input, d_weight, d_bias, None


class _BatchNormRowsBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, input, weight, mean, invstd, eps):
        ctx.save_for_backward(grad_out, input, weight, mean, invstd)
        return torch.ops.aten.native_batch_norm_backward(grad_out, input, weight, None, None, mean, invstd, True,
                                                         eps, [True, True, True])

    @staticmethod
    @once_differentiable
    def backward(ctx, u, u_gamma, u_beta):
        grad_out, input, weight, mean, invstd = ctx.saved_tensors
        d_grad_out, d_input, d_weight = batch_norm_rows_double_backward(u, u_gamma, u_beta, grad_out, input, weight,
                                                                        mean, invstd)
        return d_grad_out, d_input, d_weight, None, None, None


def batch_norm_rows(input, weight, bias, eps=1e-5):
    """Batch norm with batch statistics over the rows of ``input [R, C]`` (the channels).

    Same values and gradients as ``F.batch_norm(input, None, None, weight, bias, training=True,
    eps=eps)``; differentiable twice, the second time through one fused kernel (CPU and Triton). Under
    ``torch.autocast`` it runs in the input's dtype, as ``batch_norm`` does (weight and bias are
    taken in it; `neuronml_fast.ops._autocast`).
    """
    _checks.floating_tensor("input", input, ndim=2)
    if _autocast.target_dtype(input.device.type) is not None and input.dtype != torch.float64:
        weight, bias = (t.to(input.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                        for t in (weight, bias))
    channels = input.shape[1]
    _checks.like("weight", weight, "input", input, shape=(channels,))
    _checks.like("bias", bias, "input", input, shape=(channels,))
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if input.shape[0] < 2:
        raise ValueError(f"input: expected at least 2 rows to take batch statistics over, got shape "
                         f"{list(input.shape)}")
    return _BatchNormRows.apply(input, weight, bias, float(eps))
