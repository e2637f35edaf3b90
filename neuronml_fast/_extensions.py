"""Loading of the compiled extensions, remembering why one is missing.

Import failures are recorded, never raised here: the backend registry turns them into the
`not built: <reason>` lines of `python -m neuronml_fast` and into clear errors when a user asks
for a backend that cannot run.
"""

import functools
import importlib
import os

EMULATE_ENV = "NEURONML_FAST_CUDA_EMULATE"
EMULATE_ORDER_ENV = "NEURONML_FAST_CUDA_EMULATE_ORDER"
EMULATE_SEED_ENV = "NEURONML_FAST_CUDA_EMULATE_SEED"

_modules = {}
_errors = {}


def load(name):
    """Return the extension module ``neuronml_fast.<name>`` or None (reason kept for `error`)."""
    if name not in _modules and name not in _errors:
        try:
            _modules[name] = importlib.import_module(f"neuronml_fast.{name}")
        except ImportError as exc:  # not built, or built against another torch
            _errors[name] = str(exc) or type(exc).__name__
    return _modules.get(name)


def error(name):
    """Why ``load(name)`` returned None, or None if it loaded."""
    load(name)
    return _errors.get(name)


def cpu():
    return load("_C_cpu")


@functools.cache
def cuda_emulated():
    """Whether the ``cuda`` backend runs the CUDA C++ kernels in the CPU emulation (csrc/emu) on CPU
    tensors: ``NEURONML_FAST_CUDA_EMULATE=1``. Read once, at the first query (the backends are
    probed at import), so set it before importing the package, like ``TRITON_INTERPRET=1`` for the
    Triton kernels: every part of the package then agrees on which module runs the ``cuda``
    backend. The warp order between barriers is ``NEURONML_FAST_CUDA_EMULATE_ORDER`` (forward,
    reverse or random, the default) with ``NEURONML_FAST_CUDA_EMULATE_SEED``."""
    return os.environ.get(EMULATE_ENV, "0") == "1"


def cuda():
    """The module that runs the ``cuda`` backend's kernels: the CUDA extension, or under
    `cuda_emulated` the same kernels built against the emulation."""
    if not cuda_emulated():
        return load("_C_cuda")
    fresh = "_C_cuda_emulated" not in _modules
    module = load("_C_cuda_emulated")
    if module is not None and fresh:
        module.configure_emulation(order=os.environ.get(EMULATE_ORDER_ENV, "random"),
                                   seed=int(os.environ.get(EMULATE_SEED_ENV, "0")))
    return module


def cuda_name():
    return "_C_cuda_emulated" if cuda_emulated() else "_C_cuda"
