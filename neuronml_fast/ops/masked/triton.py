"""The Triton kernels of the masked layers (kernels/masked.py) behind the shared GPU launchers of
``gpu.py``: tile configurations, grids and launches. Importing this module imports triton."""

import functools
import math

import torch
import triton

from ...kernels import masked as kernels
from .._triton_launch import accumulation_tl_dtype, launch
from . import gpu


def _config(dtype):
    """Tile sizes, warps and whether tl.dot applies (float64 takes the FMA path). Sized so that no
    kernel spills registers on sm_80/sm_90 (bench/results/triton-aot.md): 16-bit 64 x 64 tiles on
    4 warps spill in the backward kernels, and the FMA path's [M, K, N] product limits float64 to
    K = 8. SCAN: the window of channels a program's slot search looks at per step (the input
    gradient's: four of its K blocks, so that a window fills a K block down to 25 % active)."""
    if dtype == torch.float64:
        return dict(USE_DOT=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=8)
    if dtype == torch.float32:
        return dict(USE_DOT=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)
    return dict(USE_DOT=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8)


SCAN = 64  # channels per step of the slot search of the forward and weight-gradient programs
SUM_BLOCK = 1024  # elements per program of the split reduction


def flat_grid(*blocks):
    """The 1-D grid of a kernel whose programs run over the product of these block counts
    (unflattened in the kernel by `_tile_ids`, first count fastest)."""
    return (math.prod(blocks),)


def forward_grid(geo, cfg):
    return flat_grid(triton.cdiv(geo.N * geo.HO * geo.WO, cfg["BLOCK_M"]), triton.cdiv(geo.COUT_G, cfg["BLOCK_N"]),
                     geo.T * geo.G)


def input_grad_grid(geo, cfg):
    return flat_grid(triton.cdiv(geo.N * geo.H * geo.W, cfg["BLOCK_M"]), triton.cdiv(geo.CIN_G, cfg["BLOCK_N"]),
                     geo.T * geo.G)


def weight_grad_grid(geo, cfg, splits, need_weight_grad):
    columns = geo.CIN_G * geo.KH * geo.KW
    return flat_grid(triton.cdiv(geo.COUT_G, cfg["BLOCK_M"]),
                     triton.cdiv(columns, cfg["BLOCK_N"]) if need_weight_grad else 1, geo.T * geo.G * splits)


def _sizes(geo):
    """The kernels' size arguments, in their order."""
    return (geo.N, geo.H, geo.W, geo.HO, geo.WO, geo.CIN, geo.COUT, geo.CIN_G, geo.COUT_G, geo.G)


def _conv_args(geo):
    return (*_sizes(geo), *geo.stride, *geo.padding, *geo.dilation)


class TritonConvKernels:
    @staticmethod
    def k_step(dtype):
        return _config(dtype)["BLOCK_K"]

    @staticmethod
    def check(geo):
        if max(geo.N * geo.H * geo.W, geo.N * geo.HO * geo.WO) > kernels.MAX_PIXELS:
            raise ValueError(f"masked conv2d: {geo.N} images of {geo.H}x{geo.W} pixels per task, over the "
                             f"{kernels.MAX_PIXELS} the kernels index in 32 bits; split the batch")

    @staticmethod
    def forward(geo, x, weight, mask, bias, skip_zero, out, pre, precision):
        cfg = _config(x.dtype)
        launch(
            kernels._conv_forward_kernel, forward_grid(geo, cfg),
            x, weight, mask, bias if bias is not None else mask, out, pre, *_conv_args(geo),
            KH=geo.KH, KW=geo.KW, HAS_BIAS=bias is not None, SKIP_ZERO=skip_zero, ACC=accumulation_tl_dtype(x.dtype),
            DOT_PRECISION=precision, SCAN=SCAN, **cfg)

    @staticmethod
    def input_grad(geo, grad_out, grad_pre, x, weight, mask, skip_zero, grad_input, precision):
        cfg = _config(x.dtype)
        launch(
            kernels._conv_input_grad_kernel, input_grad_grid(geo, cfg),
            grad_out, grad_pre if grad_pre is not None else grad_out, weight, mask, grad_input, *_conv_args(geo),
            KH=geo.KH, KW=geo.KW, HAS_GP=grad_pre is not None, SKIP_ZERO=skip_zero,
            ACC=accumulation_tl_dtype(x.dtype), DOT_PRECISION=precision, SCAN=4 * cfg["BLOCK_K"], **cfg)

    @staticmethod
    def weight_grad(geo, grad_out, grad_pre, pre, x, weight, mask, skip_zero, outputs, precision):
        cfg = _config(x.dtype)
        need_weight_grad = outputs.grad_weight is not None
        if outputs.part is None:
            gw, gb, gm, offsets = outputs.grad_weight, outputs.grad_bias, outputs.grad_mask, (0, 0, 0)
        else:
            gw = gb = gm = outputs.part
            offsets = (outputs.split_stride, outputs.weight_elements, outputs.weight_elements + outputs.bias_elements)
        launch(
            kernels._conv_weight_grad_kernel, weight_grad_grid(geo, cfg, outputs.splits, need_weight_grad),
            grad_out, grad_pre if grad_pre is not None else grad_out, pre if pre is not None else grad_out, x, mask,
            gw if need_weight_grad else gb, gb, gm, *_sizes(geo), outputs.splits, outputs.pixels_per_split, *offsets,
            *geo.stride, *geo.padding, *geo.dilation,
            KH=geo.KH, KW=geo.KW, HAS_GP=grad_pre is not None, HAS_PRE=pre is not None, SKIP_ZERO=skip_zero,
            COMPUTE_GW=need_weight_grad, ACC=accumulation_tl_dtype(x.dtype), DOT_PRECISION=precision, SCAN=SCAN,
            **cfg)
        if outputs.part is not None:
            launch(
                kernels._sum_splits_kernel, flat_grid(triton.cdiv(outputs.split_stride, SUM_BLOCK)),
                outputs.part, outputs.grad_weight if need_weight_grad else outputs.grad_bias, outputs.grad_bias,
                outputs.grad_mask, outputs.splits, outputs.split_stride, outputs.weight_elements,
                outputs.bias_elements, BLOCK=SUM_BLOCK)


_KERNELS = TritonConvKernels()
conv2d_forward = functools.partial(gpu.conv2d_forward, _KERNELS)
conv2d_backward = functools.partial(gpu.conv2d_backward, _KERNELS)
linear_forward = functools.partial(gpu.linear_forward, _KERNELS)
linear_backward = functools.partial(gpu.linear_backward, _KERNELS)
