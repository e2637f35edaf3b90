"""Per-neuron first-order Taylor sensitivity (SPEC section 3).

The op family in one folder: ``reference.py`` (the oracle), ``op.py`` (custom op, autograd,
vmap, public function) and one launcher module per backend (``cpu.py``, ``triton.py``,
``cuda.py``); see ``op.py``.
"""

from .op import OP, neuron_sensitivity, neuron_sensitivity_op
from .reference import neuron_sensitivity_reference

__all__ = ["OP", "neuron_sensitivity", "neuron_sensitivity_op", "neuron_sensitivity_reference"]
