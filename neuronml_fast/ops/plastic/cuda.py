"""The CUDA C++ kernels of the plastic layers (csrc/cuda/plastic.cu) behind the shared launchers of
``gpu.py`` (the same buffers as the Triton kernels of ``triton.py``); the extension checks every
tensor and plans each launch's blocks (``plastic_plan``: one or several blocks per sequence, the
forward's trace in shared memory or streamed)."""

import functools

from ... import _extensions
from . import gpu


class CudaKernels:
    # What the plan is asked for: 0 and -1 let the extension choose; tests set them to run every
    # design at small sizes (several blocks per sequence; the trace streamed or resident).
    requested_parts = 0
    requested_resident = -1

    def plan(self, p):
        """(blocks per sequence, whether the forward keeps the trace in shared memory)."""
        return _extensions.cuda().plastic_plan(p.x, p.weight, p.alpha, p.recurrent, self.requested_parts,
                                               self.requested_resident)

    def parts_per_sequence(self, p):
        return self.plan(p)[0]

    def forward(self, p, f):
        parts, resident = self.plan(p)
        _extensions.cuda().plastic_forward(
            p.x, p.weight, p.alpha, p.eta, p.bias, p.drive, p.y0, p.modulation, _accumulated(f.hebb, p), p.mod_weight,
            p.mod_bias, p.mod_fanout, f.trace, f.output, f.state, f.checkpoints, f.activity, p.clip, p.every,
            p.recurrent, p.rule, p.per_neuron, p.mod_tanh, p.tanh, p.has_clip, parts, resident)

    def backward(self, p, b):
        _extensions.cuda().plastic_backward(
            p.x, p.weight, p.alpha, p.eta, p.y0, b.output, b.grad_output, p.modulation, b.activity, p.mod_weight,
            p.mod_fanout, b.checkpoints, b.hebb_final, _accumulated(b.grad_hebb_in, p), b.trace, b.segment,
            b.grad_hebb, b.grad_z, b.grad_pre, b.grad_z_out, b.grad_pre_out, b.grad_mod, b.mod_rows, b.alpha_part,
            b.eta_part, b.mod_weight_part, b.mod_bias_part, b.mod_fanout_part, p.clip, p.every, p.recurrent, p.rule,
            p.per_neuron, p.mod_tanh, p.tanh, p.has_clip, p.recompute, b.parts)

    @staticmethod
    def reduce(p, b):
        _extensions.cuda().plastic_reduce(
            p.x, p.weight, p.alpha, p.y0, b.output, b.grad_z, b.alpha_part, b.eta_part, b.mod_weight_part,
            b.mod_bias_part, b.mod_fanout_part, b.grad_weight, b.grad_bias, b.grad_alpha, b.grad_eta,
            b.grad_mod_weight, b.grad_mod_bias, b.grad_mod_fanout, p.recurrent, b.parts)


def _accumulated(trace, p):
    """A trace (or its gradient) in the accumulation dtype the kernels read it in: ``hebb=`` also takes
    the input's dtype (SPEC section 4), which a 16-bit call converts here, one copy per call."""
    return trace if trace is None or trace.dtype == p.acc else trace.to(p.acc)


# eta is read on the host only where the checkpoint interval needs it (op._eta_and_checkpoints).
AVOIDS_HOST_READS = True
plastic_forward = functools.partial(gpu.forward, CudaKernels())
plastic_backward = functools.partial(gpu.backward, CudaKernels())
