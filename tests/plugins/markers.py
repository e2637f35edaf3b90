"""Marks the tests that run a GPU backend on CPU tensors, so a quick run can leave them out.

Without a GPU the Triton kernels run in Triton's interpreter and the CUDA C++ kernels in the CPU
emulation: they check correctness but take most of the suite's time. Every test parametrized
with such a (backend, device) pair, every test of the emulation itself and every test named for
the interpreter or the emulation gets the marker
``emulated``; ``pytest -m "not emulated"`` runs the rest. A full ``pytest`` (CI, ``make test``)
still runs everything. On a GPU machine the same tests run on CUDA tensors and are not marked.
"""

import pytest

EMULATED_BACKENDS = ("triton", "cuda")
# Modules that test the emulation itself: every test in them runs emulated kernels.
EMULATION_MODULES = ("test_cuda_emulation.py",)
# A test that runs them without a (backend, device) parameter says so in its name
# (test_cli_check_passes_under_the_interpreter runs `check` in a subprocess under TRITON_INTERPRET).
EMULATION_WORDS = ("interpreter", "emulat")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emulated: runs a GPU backend on CPU tensors (Triton interpreter, CUDA emulation); "
                   "slow, deselect with -m 'not emulated'")


def is_emulated(item):
    """True when the test runs Triton or CUDA kernels on CPU tensors."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") in EMULATED_BACKENDS and params.get("device") == "cpu":
        return True
    if item.path.name in EMULATION_MODULES:
        return True
    return any(word in item.originalname for word in EMULATION_WORDS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_emulated(item):
            item.add_marker(pytest.mark.emulated)
