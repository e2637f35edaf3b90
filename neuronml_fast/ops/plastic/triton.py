"""The Triton step kernels of the plastic layers (kernels/plastic.py) behind the shared time loops of
``gpu.py``: tiles, grids and launches. Importing this module imports triton."""

import functools

import triton

from ...kernels import plastic as kernels
from .._triton_launch import accumulation_tl_dtype, launch
from . import gpu

class TritonSteps:
    @staticmethod
    def rows_per_block(out_features, in_features):
        return min(32, triton.next_power_of_2(max(out_features, 1)))

    @staticmethod
    def _cols(p):
        """Columns per tile of the step kernels: 64, or 32 for float64, whose tiles take twice the
        registers (64 columns of float64 spill in the backward step)."""
        widest = 32 if p.x.dtype.itemsize == 8 else 64
        return min(widest, triton.next_power_of_2(max(p.in_features, 1)))

    @staticmethod
    def _flags(p):
        _check_matrix(p)
        return dict(RECURRENT=p.recurrent, RULE=p.rule, PER_NEURON=p.per_neuron, TANH=p.tanh,
                    ALPHA_SCALAR=p.alpha_scalar, HAS_CLIP=p.has_clip, ACC=accumulation_tl_dtype(p.x.dtype))

    def sequence_forward(self, p, trace, checkpoints, every):
        block_o, block_i = triton.next_power_of_2(p.out_features), triton.next_power_of_2(p.in_features)
        if p.recurrent:
            block_o = block_i = max(block_o, block_i)
        tile_bytes = block_o * block_i * p.acc.itemsize
        if (max(p.out_features, p.in_features) > kernels.SEQUENCE_KERNEL_MAX_N
                or tile_bytes > kernels.SEQUENCE_KERNEL_MAX_TILE_BYTES or p.has_clip):
            return False
        x = p.x
        launch(
            kernels._forward_sequence_kernel, (p.B,),
            x, p.weight, p.alpha, p.eta, _pointer(p.bias, x), _pointer(p.drive, x), _pointer(p.y0, x),
            _pointer(p.modulation, x), trace, p.output, checkpoints, p.T, p.B, p.out_features, p.in_features, p.clip,
            every,
            HAS_BIAS=p.bias is not None, HAS_DRIVE=p.drive is not None, HAS_Y0=p.y0 is not None,
            BLOCK_O=block_o, BLOCK_I=block_i, num_warps=_sequence_warps(tile_bytes), **self._flags(p))
        return True

    def forward_step(self, p, t, pre, trace, update_only):
        block_o = self.rows_per_block(p.out_features, p.in_features)
        x = p.x
        launch(
            kernels._forward_step_kernel, (p.B, triton.cdiv(p.out_features, block_o)),
            x, p.weight, p.alpha, p.eta, _pointer(p.bias, x), _pointer(p.drive, x), pre, _pointer(p.modulation, x),
            trace, p.output, t, p.B, p.out_features, p.in_features, p.clip, HAS_BIAS=p.bias is not None,
            HAS_DRIVE=p.drive is not None, UPDATE_ONLY=update_only, BLOCK_O=block_o,
            BLOCK_I=self._cols(p), **self._flags(p))

    def backward_step(self, p, t, pre, h, carry, reconstruct, grad_trace, grad_z, gpre_part, galpha_part, geta_part,
                      gmod_rows):
        block_o = self.rows_per_block(p.out_features, p.in_features)
        launch(
            kernels._backward_step_kernel, (p.B, triton.cdiv(p.out_features, block_o)),
            p.weight, p.alpha, p.eta, pre, p.output, p.grad_output, carry, _pointer(p.modulation, p.x), h, grad_trace,
            grad_z, gpre_part, galpha_part, geta_part, gmod_rows, t, p.B, p.out_features, p.in_features, p.clip,
            RECONSTRUCT=reconstruct, BLOCK_O=block_o, BLOCK_I=self._cols(p), **self._flags(p))


def _sequence_warps(tile_bytes):
    """The sequence kernel keeps weight, alpha and trace tiles in registers for all T steps: at
    most 32 registers of each per thread (a 128 x 128 float32 layer on 4 warps spills kilobytes)."""
    return max(4, min(16, tile_bytes // (32 * 32 * 4)))


def _check_matrix(p):
    if p.out_features * p.in_features > kernels.MAX_MATRIX:
        raise ValueError(f"plastic layer: a {p.out_features} x {p.in_features} weight has over {kernels.MAX_MATRIX} "
                         "elements, more than the Triton kernels index in 32 bits")


def _pointer(t, fallback):
    """A real pointer for an argument the kernel will not read (its HAS_* flag is off)."""
    return t if t is not None else fallback


# eta is read on the host only where the checkpoint interval needs it (op._eta_and_checkpoints).
AVOIDS_HOST_READS = True
plastic_forward = functools.partial(gpu.forward, TritonSteps())
plastic_backward = functools.partial(gpu.backward, TritonSteps())
