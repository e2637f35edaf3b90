"""The C++ CPU backend's runtime controls.

The buffer pool its large outputs come from (see neuronml_fast/_alloc.py), mirroring torch.cuda's
caching-allocator controls, and the choice of the dense kernels under the masked convolution
(csrc/cpu/bindings/conv_choice.h): the package's AVX2 gradient kernels or oneDNN (one grouped
call, or one call per task), measured per case at its first use unless a policy forces one. The
backend's launchers live with their ops, in ``neuronml_fast/ops/<family>/cpu.py``.
"""

from .. import _extensions
from .._alloc import cpu_pool_stats as pool_stats
from .._alloc import empty_cpu_cache as empty_cache
from .._alloc import set_cpu_pool_limit as set_pool_limit

CONV_POLICIES = ("auto", "own", "onednn", "onednn-grouped", "onednn-per-task")


def _ext():
    ext = _extensions.load("_C_cpu")
    if ext is None:
        raise RuntimeError("the C++ CPU extension is not built (python -m neuronml_fast says why)")
    return ext


def conv_policy():
    """How the masked conv's dense core is chosen: ``auto`` (the default: each case timed at its
    first use, the fastest remembered), ``own`` (the AVX2 gradient kernels where they apply),
    ``onednn``, ``onednn-grouped`` or ``onednn-per-task``. Set by NEURONML_FAST_CPU_CONV or
    `set_conv_policy`."""
    return _ext().conv_policy()


def set_conv_policy(policy):
    """Override NEURONML_FAST_CPU_CONV for this process (``None`` restores it)."""
    _ext().set_conv_policy("" if policy is None else policy)


def conv_choices():
    """The measured choices so far: [(case key, 'own' | 'onednn-grouped' | 'onednn-per-task')]."""
    return _ext().conv_choices()


def clear_conv_choices():
    """Forget the measured choices; each case is measured again at its next use."""
    _ext().clear_conv_choices()


__all__ = ["CONV_POLICIES", "clear_conv_choices", "conv_choices", "conv_policy", "empty_cache", "pool_stats",
           "set_conv_policy", "set_pool_limit"]
