"""neuronml_fast: fused Triton and CUDA C++ kernels for brain-inspired meta-learning.

The contract is SPEC.md (shared with every backend); see the README for a tour. Every op has a
plain-PyTorch reference (backend "reference") and up to three kernel backends ("cpu", "triton",
"cuda"), chosen per call by `neuronml_fast.backends`. `python -m neuronml_fast` reports what
runs where on this machine.
"""

import warnings

from . import backends, nn
from .backends import get_backend, set_backend, use_backend
from .ops.batch_norm import batch_norm_rows
from .ops.masked import masked_conv2d, masked_linear
from .ops.plastic import plastic_linear, plastic_rnn
from .ops.sensitivity import neuron_sensitivity

__version__ = "0.1.0"

backends.refresh()  # probe once, outside any torch.compile trace


class BackendWarning(UserWarning):
    """A compiled backend that ``auto`` would use here did not load (its ops run the reference), or
    ``NEURONML_FAST_BACKEND`` names no backend (its ops raise an error)."""


def _warn_missing_backends():
    missing = backends.missing_compiled_backends()
    if missing:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in missing.items())
        warnings.warn(f"neuronml_fast runs the reference where the compiled backends would run ({reasons}). "
                      "Build them against this torch with `pip install --no-build-isolation .`; "
                      "`python -m neuronml_fast` shows what runs where.", BackendWarning, stacklevel=3)


_warn_missing_backends()


def _warn_bad_environment():
    problem = backends.environment_problem()
    if problem:
        warnings.warn(f"{problem}. Until then every op raises this error; `python -m neuronml_fast` shows what "
                      "runs where.", BackendWarning, stacklevel=3)


_warn_bad_environment()

__all__ = [
    "BackendWarning",
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
