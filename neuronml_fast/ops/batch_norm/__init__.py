"""Batch normalization over the rows of a matrix, with a fused double backward (MAML's BN).

The op family in one folder: ``reference.py`` (the oracle), ``op.py`` (custom op, autograd,
public function) and ``cpu.py`` (the launcher); see ``op.py``.
"""

from .op import OP, batch_norm_rows, batch_norm_rows_double_backward, batch_norm_rows_double_backward_op
from .reference import batch_norm_rows_double_backward_reference

__all__ = ["OP", "batch_norm_rows", "batch_norm_rows_double_backward", "batch_norm_rows_double_backward_op",
           "batch_norm_rows_double_backward_reference"]
