"""The Triton kernels of the plastic layers (kernels/plastic.py) behind the shared launchers of
``gpu.py``: tiles, grids and launches. Importing this module imports triton."""

import functools

import triton

from ...kernels import plastic as kernels
from .._triton_launch import accumulation_tl_dtype, launch
from . import gpu

# (rows, columns, steps) of the reducing kernel's weight-gradient tile and its chunk of the (t, b) sum,
# by the accumulation dtype's element size: the chunk's outer products are a [steps, rows, columns]
# register block.
REDUCE_TILE = {4: (32, 32, 8), 8: (32, 32, 4)}


class TritonKernels:
    @staticmethod
    def tile(p):
        """(rows, columns, warps) of the streaming kernels' tile: 32 x 64 on 4 warps, 32 x 32 for
        float64, whose tiles take twice the registers (the backward's column pass holds five), and
        for 16-bit inputs, whose tiles are float32 but whose kernels also keep the pointers and
        stores of the outputs in the caller's dtype (at 32 x 64 the endogenous backward spills)."""
        widest = 32 if p.acc.itemsize == 8 or p.narrow else 64
        rows = min(32, triton.next_power_of_2(max(p.out_features, 1)))
        cols = min(widest, triton.next_power_of_2(max(p.in_features, 1)))
        return rows, cols, 4

    @staticmethod
    def resident_tile(p):
        """(rows, columns, warps) of the resident forward, or None where the layer does not fit it."""
        block_o, block_i = triton.next_power_of_2(p.out_features), triton.next_power_of_2(p.in_features)
        if p.recurrent:
            block_o = block_i = max(block_o, block_i)
        tile_bytes = block_o * block_i * p.acc.itemsize
        if max(p.out_features, p.in_features) > kernels.RESIDENT_MAX_N or tile_bytes > kernels.RESIDENT_MAX_TILE_BYTES:
            return None
        # weight, alpha and trace tiles in registers for all T steps: at most 32 registers of each
        # per thread (a 128 x 128 float32 layer on 4 warps spills kilobytes).
        return block_o, block_i, max(4, min(16, tile_bytes // (32 * 32 * 4)))

    @staticmethod
    def parts_per_sequence(p):
        return 1  # one program per sequence

    @staticmethod
    def _flags(p):
        _check_matrix(p)
        return dict(RECURRENT=p.recurrent, RULE=p.rule, PER_NEURON=p.per_neuron, ENDOGENOUS=p.endogenous,
                    MOD_TANH=p.mod_tanh, HAS_MOD_BIAS=p.mod_bias is not None, HAS_FANOUT=p.mod_fanout is not None,
                    TANH=p.tanh, ALPHA_SCALAR=p.alpha_scalar, HAS_CLIP=p.has_clip,
                    ACC=accumulation_tl_dtype(p.x.dtype))

    def forward(self, p, f):
        resident = self.resident_tile(p)
        kernel = kernels._forward_resident_kernel if resident else kernels._forward_kernel
        block_o, block_i, warps = resident or self.tile(p)
        x = p.x
        launch(
            kernel, (p.B,),
            x, p.weight, p.alpha, p.eta, _pointer(p.bias, x), _pointer(p.drive, x), _pointer(p.y0, x),
            _pointer(p.modulation, x), _pointer(f.hebb, x), f.trace, f.state, f.checkpoints, _pointer(f.activity, x),
            _pointer(p.mod_weight, x), _pointer(p.mod_bias, x), _pointer(p.mod_fanout, x), f.output, p.T, p.B,
            p.out_features, p.in_features, p.clip, p.every,
            HAS_BIAS=p.bias is not None, HAS_DRIVE=p.drive is not None, HAS_Y0=p.y0 is not None,
            HAS_HEBB=f.hebb is not None, NARROW=p.narrow, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=warps,
            **self._flags(p))

    def backward(self, p, b):
        block_o, block_i, warps = self.tile(p)
        x = p.x
        launch(
            kernels._backward_kernel, (p.B,),
            x, p.weight, p.alpha, p.eta, _pointer(p.y0, x), b.output, _pointer(b.grad_output, x),
            _pointer(p.modulation, x), _pointer(b.activity, x), _pointer(p.mod_weight, x), _pointer(p.mod_fanout, x),
            b.checkpoints, b.hebb_final, _pointer(b.grad_hebb_in, x), _pointer(b.trace, x), _pointer(b.segment, x),
            b.grad_hebb, b.grad_z, b.grad_pre, _pointer(b.grad_mod, x), _pointer(b.mod_rows, x), b.alpha_part,
            b.eta_part, _pointer(b.mod_weight_part, x), _pointer(b.mod_bias_part, x), _pointer(b.mod_fanout_part, x),
            b.grad_z_out, b.grad_pre_out, p.T, p.B, p.out_features, p.in_features, p.clip, p.every,
            HAS_Y0=p.y0 is not None, HAS_GOUT=b.grad_output is not None, HAS_GHEBB=b.grad_hebb_in is not None,
            RECOMPUTE=p.recompute, NARROW=p.narrow, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=warps, **self._flags(p))

    @staticmethod
    def reduce(p, b):
        x = p.x
        # float64 tiles take twice the registers: half the steps per chunk of the (t, b) sum
        block_o, block_i, block_k = REDUCE_TILE[p.acc.itemsize]
        block_o = min(block_o, triton.next_power_of_2(max(p.out_features, 1)))
        block_i = min(block_i, triton.next_power_of_2(max(p.in_features, 1)))
        launch(
            kernels._reduce_kernel, (triton.cdiv(p.out_features, block_o), triton.cdiv(p.in_features, block_i)),
            x, _pointer(p.y0, x), b.output, b.grad_z, b.alpha_part, b.eta_part, _pointer(b.mod_weight_part, x),
            _pointer(b.mod_bias_part, x), _pointer(b.mod_fanout_part, x), b.grad_weight, _pointer(b.grad_bias, x),
            b.grad_alpha, b.grad_eta, _pointer(b.grad_mod_weight, x), _pointer(b.grad_mod_bias, x),
            _pointer(b.grad_mod_fanout, x), p.T, p.B, p.out_features, p.in_features,
            RECURRENT=p.recurrent, HAS_Y0=p.y0 is not None, ALPHA_SCALAR=p.alpha_scalar, ENDOGENOUS=p.endogenous,
            HAS_MOD_BIAS=p.mod_bias is not None, HAS_FANOUT=p.mod_fanout is not None,
            ACC=accumulation_tl_dtype(x.dtype), BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_K=block_k)


def _check_matrix(p):
    if p.out_features * p.in_features > kernels.MAX_MATRIX:
        raise ValueError(f"plastic layer: a {p.out_features} x {p.in_features} weight has over {kernels.MAX_MATRIX} "
                         "elements, more than the Triton kernels index in 32 bits")


def _pointer(t, fallback):
    """A real pointer for an argument the kernel will not read (its HAS_* flag is off)."""
    return t if t is not None else fallback


# eta is read on the host only where the checkpoint interval needs it (op._eta_and_checkpoints).
AVOIDS_HOST_READS = True
plastic_forward = functools.partial(gpu.forward, TritonKernels())
plastic_backward = functools.partial(gpu.backward, TritonKernels())
