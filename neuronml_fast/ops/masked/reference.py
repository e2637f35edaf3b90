"""The oracle of the masked layers: plain eager PyTorch, and the convolution's output size."""

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def conv_output_hw(input_hw, kernel_hw, stride, padding, dilation):
    """(H_out, W_out) of a convolution: PyTorch's formula (for C++: csrc/common/conv_size.h)."""
    return tuple((input_hw[i] + 2 * padding[i] - dilation[i] * (kernel_hw[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def conv_output_shape(x, weight, stride, padding, dilation):
    """x [T, N, C, H, W] (or [N, C, H, W]), weight [..., C_out, C_in/g, kH, kW] -> output shape."""
    return (*x.shape[:-3], weight.shape[-4], *conv_output_hw(x.shape[-2:], weight.shape[-2:], stride, padding,
                                                             dilation))


def _gate(pre, mask, skip_zero, channel_dim):
    shape = [1] * pre.dim()
    shape[channel_dim] = -1
    mask = mask.view(shape)
    if not skip_zero:
        return mask * pre
    keep = mask != 0
    # where() on both factors: a pruned neuron is exactly 0 with exactly-0 gradients, even if
    # its pre-activation is inf or nan.
    return torch.where(keep, mask, 0) * torch.where(keep, pre, 0)


def masked_conv2d_reference(input, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1,
                            skip_zero=True):
    """Plain eager PyTorch; task-batched inputs are a Python loop over tasks."""
    if input.dim() == 5:
        outs = [
            masked_conv2d_reference(input[t], weight[t], mask[t], None if bias is None else bias[t], stride,
                                    padding, dilation, groups, skip_zero)
            for t in range(input.shape[0])
        ]
        if outs:
            return torch.stack(outs)
        return input.new_zeros(conv_output_shape(input, weight, _pair(stride), _pair(padding), _pair(dilation)))
    pre = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _gate(pre, mask, skip_zero, channel_dim=1)


def masked_linear_reference(input, weight, mask, bias=None, skip_zero=True):
    """Plain eager PyTorch; task-batched inputs (3-d weight) are a Python loop over tasks."""
    if weight.dim() == 3:
        outs = [masked_linear_reference(input[t], weight[t], mask[t], None if bias is None else bias[t], skip_zero)
                for t in range(weight.shape[0])]
        return torch.stack(outs) if outs else input.new_zeros((*input.shape[:-1], weight.shape[1]))
    return _gate(F.linear(input, weight, bias), mask, skip_zero, channel_dim=-1)
