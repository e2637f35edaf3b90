"""CUDA C++ launchers of the masked conv2d / linear layers (SPEC section 2).

The kernels are in ``csrc/cuda/masked.cu`` (same design as the Triton kernels in
``kernels/masked.py``); this module allocates the outputs, plans the device-side compaction and
reduces the split-K partial sums of the weight gradient.
"""

import functools
import math

import torch

from .. import _alloc, _conv_plan, _extensions


def _new(shape, like, dtype=None):
    return _alloc.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def conv2d_forward(x, weight, mask, bias, stride, padding, dilation, groups, skip_zero, contiguous_output=True):
    # out and pre are always contiguous here: contiguous_output needs nothing.
    x, weight, mask, bias = _contiguous(x, weight, mask, bias)
    shape = (x.shape[0], x.shape[1], weight.shape[1], *_conv_plan.output_hw(x, weight, stride, padding, dilation))
    out, pre = _new(shape, x), _new(shape, x)
    if out.numel():
        order, count = _conv_plan.compaction(mask, groups, skip_zero)
        _extensions.cuda().masked_conv_forward_out(x, weight, mask, bias, order, count, stride, padding, dilation,
                                                   groups, out, pre)
    return out, pre


def conv2d_backward(grad_out, grad_pre, x, weight, mask, pre, stride, padding, dilation, groups, skip_zero,
                    need_input_grad, need_weight_grad, contiguous_input_grad=True):
    # grad_input is always contiguous here: contiguous_input_grad needs nothing.
    grad_out, grad_pre, x, weight, mask, pre = _contiguous(grad_out, grad_pre, x, weight, mask, pre)
    ext = _extensions.cuda()
    order, count = _conv_plan.compaction(mask, groups, skip_zero)
    grad_input = x.new_empty((0,))
    if need_input_grad:
        grad_input = _new(x.shape, x)
        if grad_input.numel():
            ext.masked_conv_input_grad_out(grad_out, grad_pre, x, weight, mask, order, count, stride, padding,
                                           dilation, groups, grad_input)
    T, C = mask.shape
    acc = _alloc.accumulation_dtype(x.dtype)
    pixels = grad_out.shape[1] * grad_out.shape[3] * grad_out.shape[4]
    splits, per_split = _conv_plan.weight_grad_splits(pixels, ext.MASKED_K_STEP)
    gw_part = _new((splits, T, C, math.prod(weight.shape[2:])), x, acc) if need_weight_grad else None
    gb_part, gm_part = _new((splits, T, C), x, acc), _new((splits, T, C), x, acc)
    if T * C:
        ext.masked_conv_weight_grad_out(grad_out, grad_pre, pre, x, weight, mask, order, count, stride, padding,
                                        dilation, groups, splits, per_split, gw_part, gb_part, gm_part)
    grad_weight = gw_part.sum(0).to(x.dtype).view(weight.shape) if need_weight_grad else x.new_empty((0,))
    return grad_input, grad_weight, gb_part.sum(0).to(x.dtype), gm_part.sum(0).to(x.dtype)


linear_forward = functools.partial(_conv_plan.linear_forward, conv2d_forward)
linear_backward = functools.partial(_conv_plan.linear_backward, conv2d_backward)
