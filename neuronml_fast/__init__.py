"""neuronml_fast: fused Triton and CUDA C++ kernels for brain-inspired meta-learning.

The contract is SPEC.md (shared with every backend); see the README for a tour. Every op has a
plain-PyTorch reference (backend "reference") and up to three kernel backends ("cpu", "triton",
"cuda"), chosen per call by `neuronml_fast.backends`. `python -m neuronml_fast` reports what
runs where on this machine.
"""

from . import backends, nn
from .backends import get_backend, set_backend, use_backend
from .ops.batch_norm import batch_norm_rows
from .ops.masked import masked_conv2d, masked_linear
from .ops.plastic import plastic_linear, plastic_rnn
from .ops.sensitivity import neuron_sensitivity

__version__ = "0.1.0"

backends.refresh()  # probe once, outside any torch.compile trace

__all__ = [
    "backends",
    "batch_norm_rows",
    "get_backend",
    "masked_conv2d",
    "masked_linear",
    "nn",
    "plastic_linear",
    "plastic_rnn",
    "neuron_sensitivity",
    "set_backend",
    "use_backend",
]
