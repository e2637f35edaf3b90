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
        """The kernels index one task's tensors in 32 bits (the extension checks it too)."""
        limit = _extensions.cuda().MASKED_MAX_INDEX
        sizes = {"input": geo.N * geo.CIN * geo.H * geo.W, "output": geo.N * geo.COUT * geo.HO * geo.WO,
                 "weight": geo.COUT * geo.CIN_G * geo.KH * geo.KW}
        for name, elements in sizes.items():
            if elements > limit:
                raise ValueError(f"masked conv2d: {name} of {elements} elements per task, over the {limit} the CUDA "
                                 f"kernels index in 32 bits; split the batch")

    @staticmethod
    def forward(geo, x, weight, mask, bias, skip_zero, out, pre, precision):
        _extensions.cuda().masked_conv_forward_out(x, weight, mask, bias, geo.stride, geo.padding, geo.dilation, geo.G,
                                                   skip_zero, precision == gpu.TF32, out, pre)

    @staticmethod
    def input_grad(geo, grad_out, grad_pre, x, weight, mask, skip_zero, grad_input, precision):
        _extensions.cuda().masked_conv_input_grad_out(grad_out, grad_pre, x, weight, mask, geo.stride, geo.padding,
                                                      geo.dilation, geo.G, skip_zero, precision == gpu.TF32,
                                                      grad_input)

    @staticmethod
    def weight_grad(geo, grad_out, grad_pre, pre, x, weight, mask, skip_zero, outputs, precision):
        _extensions.cuda().masked_conv_weight_grad_out(grad_out, grad_pre, pre, x, weight, mask, geo.stride,
                                                       geo.padding, geo.dilation, geo.G, skip_zero,
                                                       precision == gpu.TF32, outputs.splits,
                                                       outputs.pixels_per_split, outputs.part, outputs.grad_weight,
                                                       outputs.grad_bias, outputs.grad_mask)


_KERNELS = CudaConvKernels()
conv2d_forward = functools.partial(gpu.conv2d_forward, _KERNELS)
conv2d_backward = functools.partial(gpu.conv2d_backward, _KERNELS)
linear_forward = functools.partial(gpu.linear_forward, _KERNELS)
linear_backward = functools.partial(gpu.linear_backward, _KERNELS)
