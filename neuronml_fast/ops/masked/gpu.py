"""The launchers of the GPU backends (Triton and CUDA C++) of the masked layers, written once.

A backend passes its kernels as the ``kernels`` argument, an object with ``k_step(dtype)`` (the
pixel block of its weight-gradient reduction), ``check(geometry)`` (its own size limits),
``forward``, ``input_grad`` (one launch each) and ``weight_grad`` (the weight, bias and mask
gradients: one launch, and one more that adds the partial sums when the pixels are split):
`triton.TritonConvKernels`, `cuda.CudaConvKernels`. This module owns everything around them:
contiguous operands (a copy only of an operand that is not), output allocation, the split of
the weight gradient's pixel reduction, the linear layers as 1x1 convolutions, and the precision
of the float32 GEMMs (`dot_precision`), decided once per call from torch's switches and passed
to every kernel of the call.

The kernels find the active neurons themselves, from the mask on the device: no host
synchronization and no planning launch, so a forward is one launch and a backward two or three.
"""

import dataclasses
from typing import Optional

import torch

from ... import _alloc, _precision
from .reference import conv_output_hw

IEEE, TF32 = "ieee", "tf32"


def dot_precision(dtype, op):
    """How the GEMMs of one call multiply: "tf32" (float32 operands rounded to TF32 on the tensor
    cores, products accumulated in float32) for float32 where torch's switch for ``op`` allows it
    ("conv" for the convolutions, "matmul" for the linear layers, as torch's own layers), "ieee"
    otherwise (exact float32 products; float16/bfloat16 always run on the tensor cores, float64
    as float64)."""
    return TF32 if dtype == torch.float32 and _precision.tf32_allowed(op) else IEEE


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The sizes of a task-batched convolution, x [T, N, CIN, H, W] and weight [T, COUT, CIN_G, KH, KW],
    and its stride, padding and dilation pairs."""

    T: int
    N: int
    CIN: int
    H: int
    W: int
    COUT: int
    CIN_G: int
    KH: int
    KW: int
    HO: int
    WO: int
    G: int
    stride: tuple
    padding: tuple
    dilation: tuple

    @property
    def COUT_G(self):
        return self.COUT // self.G

    @classmethod
    def of(cls, x, weight, stride, padding, dilation, groups):
        T, N, CIN, H, W = x.shape
        COUT, CIN_G, KH, KW = weight.shape[1:]
        HO, WO = conv_output_hw((H, W), (KH, KW), stride, padding, dilation)
        return cls(T, N, CIN, H, W, COUT, CIN_G, KH, KW, HO, WO, groups, tuple(stride), tuple(padding),
                   tuple(dilation))


def weight_grad_splits(pixels, block, max_splits=64, pixels_per_program=4096):
    """Split the pixel reduction of the weight gradient so that enough programs run:
    returns (splits, pixels per split), the latter a multiple of ``block``."""
    pixels = max(pixels, 1)
    splits = max(1, min(max_splits, -(-pixels // pixels_per_program)))
    per_split = -(-(-(-pixels // splits)) // block) * block
    return -(-pixels // per_split), per_split


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _new(shape, like, dtype=None):
    return _alloc.empty(shape, dtype=dtype or like.dtype, device=like.device)


def conv2d_forward(kernels, x, weight, mask, bias, stride, padding, dilation, groups, skip_zero,
                   contiguous_output=True, op=_precision.CONV):
    # out and pre are always contiguous here: contiguous_output needs nothing.
    x, weight, mask, bias = _contiguous(x, weight, mask, bias)
    geo = ConvGeometry.of(x, weight, stride, padding, dilation, groups)
    kernels.check(geo)
    shape = (geo.T, geo.N, geo.COUT, geo.HO, geo.WO)
    out, pre = _new(shape, x), _new(shape, x)
    if out.numel():
        kernels.forward(geo, x, weight, mask, bias, skip_zero, out, pre, dot_precision(x.dtype, op))
    return out, pre


@dataclasses.dataclass(frozen=True)
class WeightGradOutputs:
    """Where the weight-gradient kernel writes. ``part`` is None without a split: the kernel then
    writes ``grad_weight`` (None when not needed), ``grad_bias`` and ``grad_mask`` itself. With
    ``splits`` > 1 it writes ``part [splits, split_stride]`` in the accumulation dtype (each row:
    the weight-gradient elements, then the bias and the mask ones), and one more launch adds the
    rows into the three gradients."""

    splits: int
    pixels_per_split: int
    grad_weight: Optional[torch.Tensor]
    grad_bias: torch.Tensor
    grad_mask: torch.Tensor
    part: Optional[torch.Tensor]

    @property
    def weight_elements(self):
        return 0 if self.grad_weight is None else self.grad_weight.numel()

    @property
    def bias_elements(self):
        return self.grad_bias.numel()

    @property
    def split_stride(self):
        return self.weight_elements + 2 * self.bias_elements


def _weight_grad_outputs(kernels, geo, x, weight, mask, need_weight_grad):
    splits, per_split = weight_grad_splits(geo.N * geo.HO * geo.WO, kernels.k_step(x.dtype))
    grad_weight = _new(weight.shape, weight) if need_weight_grad else None
    grad_bias, grad_mask = _new(mask.shape, x), _new(mask.shape, x)
    part = None
    if splits > 1:
        row = (grad_weight.numel() if need_weight_grad else 0) + 2 * grad_bias.numel()
        part = _new((splits, row), x, _alloc.accumulation_dtype(x.dtype))
    return WeightGradOutputs(splits, per_split, grad_weight, grad_bias, grad_mask, part)


def conv2d_backward(kernels, grad_out, grad_pre, x, weight, mask, pre, stride, padding, dilation, groups, skip_zero,
                    need_input_grad, need_weight_grad, contiguous_input_grad=True, op=_precision.CONV):
    # grad_input is always contiguous here: contiguous_input_grad needs nothing.
    grad_out, grad_pre, x, weight, mask, pre = _contiguous(grad_out, grad_pre, x, weight, mask, pre)
    geo = ConvGeometry.of(x, weight, stride, padding, dilation, groups)
    kernels.check(geo)
    precision = dot_precision(x.dtype, op)
    grad_input = x.new_empty((0,))
    if need_input_grad:
        grad_input = _new(x.shape, x)
        if grad_input.numel():
            kernels.input_grad(geo, grad_out, grad_pre, x, weight, mask, skip_zero, grad_input, precision)
    outputs = _weight_grad_outputs(kernels, geo, x, weight, mask, need_weight_grad)
    if geo.T * geo.COUT:
        kernels.weight_grad(geo, grad_out, grad_pre, pre, x, weight, mask, skip_zero, outputs, precision)
    grad_weight = outputs.grad_weight if need_weight_grad else x.new_empty((0,))
    return grad_input, grad_weight, outputs.grad_bias, outputs.grad_mask


# A linear layer is the 1x1 convolution of a 1x1 image: the same kernels serve it, under torch's
# matmul switch (an eager nn.Linear's) rather than the convolutions' one.


def linear_forward(kernels, x, weight, mask, bias, skip_zero):
    out, pre = conv2d_forward(kernels, x[..., None, None], weight[..., None, None], mask, bias, (1, 1), (0, 0),
                              (1, 1), 1, skip_zero, op=_precision.MATMUL)
    return out.view(out.shape[:3]), pre.view(pre.shape[:3])


def linear_backward(kernels, grad_out, grad_pre, x, weight, mask, pre, skip_zero, need_input_grad, need_weight_grad):
    image = lambda t: None if t is None else t[..., None, None]  # noqa: E731
    gx, gw, gb, gm = conv2d_backward(kernels, image(grad_out), image(grad_pre), image(x), image(weight), mask,
                                     image(pre), (1, 1), (0, 0), (1, 1), 1, skip_zero, need_input_grad,
                                     need_weight_grad, op=_precision.MATMUL)
    return (gx.view(x.shape) if need_input_grad else gx), (gw.view(weight.shape) if need_weight_grad else gw), gb, gm

