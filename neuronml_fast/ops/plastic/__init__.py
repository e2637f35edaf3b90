"""Hebbian plasticity: differentiable plasticity and backpropamine (SPEC section 4).

The op family in one folder: ``reference.py`` (the oracle), ``op.py`` (checks, custom ops,
autograd, checkpoint policy, public functions), ``rules.py`` (the kernels' rule codes) and one
launcher module per backend (``cpu.py``; ``gpu.py`` with ``triton.py`` and ``cuda.py``); see
``op.py``.
"""

from .op import (ACTIVATIONS, OP, RULES, Modulator, checkpoint_every, plastic_backward_op, plastic_linear, plastic_op,
                 plastic_rnn, recomputes, trace_dtype)
from .reference import endogenous_modulation, plastic_linear_reference, plastic_rnn_reference

__all__ = ["ACTIVATIONS", "OP", "RULES", "Modulator", "checkpoint_every", "endogenous_modulation",
           "plastic_backward_op", "plastic_linear", "plastic_linear_reference", "plastic_op", "plastic_rnn",
           "plastic_rnn_reference", "recomputes", "trace_dtype"]
