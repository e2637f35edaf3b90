"""CUDA C++ step kernels of the plastic layers (csrc/cuda/plastic.cu) behind the shared time loops
of ``gpu.py`` (the same contract as the Triton steps of ``triton.py``)."""

import functools

from ... import _extensions
from . import step_loops as gpu


class CudaSteps:
    @staticmethod
    def rows_per_block(out_features, in_features):
        return _extensions.cuda().PLASTIC_ROWS_PER_BLOCK  # one warp per row

    @staticmethod
    def sequence_forward(p, trace, checkpoints, every):
        """One launch for the whole sequence when N <= 128 and no clip (trace in shared memory);
        False (nothing launched) otherwise, and the driver runs the step kernels."""
        if max(p.out_features, p.in_features) > _extensions.cuda().PLASTIC_SEQUENCE_MAX_N or p.has_clip:
            return False
        return _extensions.cuda().plastic_forward_sequence(
            p.x, p.weight, p.alpha, p.eta, p.bias, p.drive, p.y0, p.modulation, trace, p.output, checkpoints, every,
            p.recurrent, p.rule, p.per_neuron, p.tanh, p.has_clip)

    @staticmethod
    def forward_step(p, t, pre, trace, update_only):
        _extensions.cuda().plastic_forward_step(
            p.x, p.weight, p.alpha, p.eta, p.clip, p.bias, p.drive, pre, p.modulation, trace, p.output, t,
            p.recurrent, p.rule, p.per_neuron, p.tanh, p.has_clip, update_only)

    @staticmethod
    def backward_step(p, t, pre, h, carry, reconstruct, grad_trace, grad_z, gpre_part, galpha_part, geta_part,
                      gmod_rows):
        _extensions.cuda().plastic_backward_step(
            p.weight, p.alpha, p.eta, p.clip, pre, p.output, p.grad_output, carry, p.modulation, h, grad_trace, grad_z,
            gpre_part, galpha_part, geta_part, gmod_rows, t, p.recurrent, p.rule, p.per_neuron, p.tanh, p.has_clip,
            reconstruct)


# eta is read on the host only where the checkpoint interval needs it (op._eta_and_checkpoints).
AVOIDS_HOST_READS = True
plastic_forward = functools.partial(gpu.forward, CudaSteps())
plastic_backward = functools.partial(gpu.backward, CudaSteps())
