"""Test set-up shared by every test module.

* Triton kernels run on CPU tensors under the interpreter when no GPU is present; the variable
  must be set before triton is imported, hence here, before neuronml_fast is imported. Likewise
  the CUDA C++ kernels run in the CPU emulation (NEURONML_FAST_CUDA_EMULATE=1).
* Every kernel output buffer is allocated NaN-filled, so an element a kernel forgets to write
  fails the comparison against the reference.
* Every test starts from the same global random state, so a test draws the same data whichever
  tests ran before it (a subset, another order, CI's full pass).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NEURONML_FAST_CUDA_EMULATE", "1")
os.environ.setdefault("NEURONML_FAST_POISON", "1")

import pytest  # noqa: E402

# Marks the tests that run an emulated GPU backend on CPU tensors (`pytest -m "not emulated"`).
pytest_plugins = ["plugins.markers"]

import neuronml_fast as nf  # noqa: E402
from neuronml_fast import _precision  # noqa: E402

from hypothesis import settings  # noqa: E402

# The Triton interpreter is slow: keep property tests small and free of deadlines.
settings.register_profile("neuronml_fast", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("neuronml_fast")


def kernel_backends():
    """(backend, device) pairs of the non-reference backends that can run here."""
    return [
        pytest.param(name, device, id=f"{name}-{device}")
        for name in ("cpu", "triton", "cuda")
        for device in sorted(nf.backends.status(name).devices)
    ]


def interpreted(backend, device):
    """True when the Triton kernels run in the (slow) interpreter on CPU tensors."""
    return backend == "triton" and device == "cpu"


def emulated_gpu(backend, device):
    """True when a GPU backend runs on CPU tensors: Triton interpreted, CUDA emulated (both slow)."""
    return backend in ("triton", "cuda") and device == "cpu"


def gpu_backends():
    """(backend, device) pairs of the GPU kernel backends that can run here, emulated ones included."""
    return [p for p in kernel_backends() if p.values[0] in ("triton", "cuda")]


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = nf.get_backend()
    yield
    nf.set_backend(previous)


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 GEMMs in IEEE float32 unless a test turns TF32 on (neuronml_fast._precision), as
    torch's own tests do for everything but their TF32 cases: the float32 tolerances of the oracle
    are for exact float32 products. The GPU backends' TF32 paths have their own tests
    (tests/test_masked.py), which set the switches themselves."""
    with _precision.full_float32():
        yield
