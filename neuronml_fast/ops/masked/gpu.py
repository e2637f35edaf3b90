"""The launchers of the GPU backends (Triton and CUDA C++) of the masked layers, written once.

A backend passes its kernels as the ``kernels`` argument, an object with ``k_step(dtype)`` (the
pixel block of its weight-gradient reduction), ``check(geometry)`` (its own size limits),
``forward``, ``input_grad`` and ``weight_grad`` (one launch each; ``weight_grad`` also reduces
the bias and mask gradients, and computes the weight gradient only where ``gw_part`` is given):
`triton.TritonConvKernels`, `cuda.CudaConvKernels`. This module owns everything around them:
contiguous operands, output allocation, the device-side compaction plan, the split of the weight
gradient's pixel reduction and the sum of its partials, and the linear layers as 1x1
convolutions.

The planning runs on the device with torch ops: no host synchronization, so a launch never
waits for the mask to be read back.
"""

import dataclasses

import torch

from ... import _alloc
from .reference import conv_output_hw


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


def compaction(mask, groups, skip_zero):
    """Per (task, group): its channels ordered active first ``[T*G, C/G]`` int32, and the active
    count ``[T*G]`` int32. Blocks of slots past the count skip their GEMM entirely."""
    T, C = mask.shape
    keep = mask != 0 if skip_zero else torch.ones_like(mask, dtype=torch.bool)
    keep = keep.reshape(T * groups, C // groups)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()
    return order, keep.sum(1, dtype=torch.int32)


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
                   contiguous_output=True):
    # out and pre are always contiguous here: contiguous_output needs nothing.
    x, weight, mask, bias = _contiguous(x, weight, mask, bias)
    geo = ConvGeometry.of(x, weight, stride, padding, dilation, groups)
    kernels.check(geo)
    shape = (geo.T, geo.N, geo.COUT, geo.HO, geo.WO)
    out, pre = _new(shape, x), _new(shape, x)
    if out.numel():
        order, count = compaction(mask, groups, skip_zero)
        kernels.forward(geo, x, weight, mask, bias, order, count, out, pre)
    return out, pre


def conv2d_backward(kernels, grad_out, grad_pre, x, weight, mask, pre, stride, padding, dilation, groups, skip_zero,
                    need_input_grad, need_weight_grad, contiguous_input_grad=True):
    # grad_input is always contiguous here: contiguous_input_grad needs nothing.
    grad_out, grad_pre, x, weight, mask, pre = _contiguous(grad_out, grad_pre, x, weight, mask, pre)
    geo = ConvGeometry.of(x, weight, stride, padding, dilation, groups)
    kernels.check(geo)
    order, count = compaction(mask, groups, skip_zero)
    grad_input = x.new_empty((0,))
    if need_input_grad:
        grad_input = _new(x.shape, x)
        if grad_input.numel():
            kernels.input_grad(geo, grad_out, grad_pre, x, weight, mask, order, count, grad_input)
    acc = _alloc.accumulation_dtype(x.dtype)
    splits, per_split = weight_grad_splits(geo.N * geo.HO * geo.WO, kernels.k_step(x.dtype))
    K = geo.CIN_G * geo.KH * geo.KW
    gw_part = _new((splits, geo.T, geo.COUT, K), x, acc) if need_weight_grad else None
    gb_part, gm_part = _new((splits, geo.T, geo.COUT), x, acc), _new((splits, geo.T, geo.COUT), x, acc)
    if geo.T * geo.COUT:
        kernels.weight_grad(geo, grad_out, grad_pre, pre, x, weight, mask, order, count, splits, per_split, gw_part,
                            gb_part, gm_part)
    grad_weight = gw_part.sum(0).to(x.dtype).view(weight.shape) if need_weight_grad else x.new_empty((0,))
    return grad_input, grad_weight, gb_part.sum(0).to(x.dtype), gm_part.sum(0).to(x.dtype)


# A linear layer is the 1x1 convolution of a 1x1 image: the same kernels serve it.


def linear_forward(kernels, x, weight, mask, bias, skip_zero):
    out, pre = conv2d_forward(kernels, x[..., None, None], weight[..., None, None], mask, bias, (1, 1), (0, 0),
                              (1, 1), 1, skip_zero)
    return out.view(out.shape[:3]), pre.view(pre.shape[:3])


def linear_backward(kernels, grad_out, grad_pre, x, weight, mask, pre, skip_zero, need_input_grad, need_weight_grad):
    image = lambda t: None if t is None else t[..., None, None]  # noqa: E731
    gx, gw, gb, gm = conv2d_backward(kernels, image(grad_out), image(grad_pre), image(x), image(weight), mask,
                                     image(pre), (1, 1), (0, 0), (1, 1), 1, skip_zero, need_input_grad,
                                     need_weight_grad)
    return (gx.view(x.shape) if need_input_grad else gx), (gw.view(weight.shape) if need_weight_grad else gw), gb, gm

