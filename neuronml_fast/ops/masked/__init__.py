"""Masked (structure-gated) conv2d and linear: NeuronML's flexible structure (SPEC section 2).

The op family in one folder: ``reference.py`` (the oracle), ``op.py`` (checks, custom ops,
autograd, public functions) and one launcher module per backend (``cpu.py``; ``gpu.py`` with
``triton.py`` and ``cuda.py``); see ``op.py``.
"""

from .op import (CONV, LINEAR, ContiguousConvLayout, masked_conv2d, masked_conv2d_backward_op, masked_conv2d_op,
                 masked_linear, masked_linear_backward_op, masked_linear_op)
from .reference import masked_conv2d_reference, masked_linear_reference

__all__ = ["CONV", "LINEAR", "ContiguousConvLayout", "masked_conv2d", "masked_conv2d_backward_op", "masked_conv2d_op",
           "masked_conv2d_reference", "masked_linear", "masked_linear_backward_op", "masked_linear_op",
           "masked_linear_reference"]
