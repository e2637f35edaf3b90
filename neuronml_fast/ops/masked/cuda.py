"""The CUDA C++ kernels of the masked layers (csrc/cuda/masked.cu) behind the shared GPU launchers
of ``gpu.py``; the extension checks every tensor and launch."""

import functools

from ... import _extensions
from . import gpu


class CudaConvKernels:
    @staticmethod
    def k_step(dtype):
        return _extensions.cuda().MASKED_K_STEP

    @staticmethod
    def check(geo):
        """The extension checks sizes itself (TORCH_CHECK)."""

    @staticmethod
    def forward(geo, x, weight, mask, bias, skip_zero, out, pre):
        _extensions.cuda().masked_conv_forward_out(x, weight, mask, bias, geo.stride, geo.padding, geo.dilation, geo.G,
                                                   skip_zero, out, pre)

    @staticmethod
    def input_grad(geo, grad_out, grad_pre, x, weight, mask, skip_zero, grad_input):
        _extensions.cuda().masked_conv_input_grad_out(grad_out, grad_pre, x, weight, mask, geo.stride, geo.padding,
                                                      geo.dilation, geo.G, skip_zero, grad_input)

    @staticmethod
    def weight_grad(geo, grad_out, grad_pre, pre, x, weight, mask, skip_zero, outputs):
        _extensions.cuda().masked_conv_weight_grad_out(grad_out, grad_pre, pre, x, weight, mask, geo.stride,
                                                       geo.padding, geo.dilation, geo.G, skip_zero, outputs.splits,
                                                       outputs.pixels_per_split, outputs.part, outputs.grad_weight,
                                                       outputs.grad_bias, outputs.grad_mask)


_KERNELS = CudaConvKernels()
conv2d_forward = functools.partial(gpu.conv2d_forward, _KERNELS)
conv2d_backward = functools.partial(gpu.conv2d_backward, _KERNELS)
linear_forward = functools.partial(gpu.linear_forward, _KERNELS)
linear_backward = functools.partial(gpu.linear_backward, _KERNELS)
