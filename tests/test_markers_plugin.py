"""The test-suite plugin that marks the GPU backends run on CPU tensors (tests/plugins/markers.py)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from plugins.markers import is_emulated

TESTS = os.path.dirname(os.path.abspath(__file__))


def _item(params=None, module="test_masked.py", name="test_forward"):
    callspec = SimpleNamespace(params=params) if params is not None else None
    return SimpleNamespace(callspec=callspec, path=Path(TESTS) / module, originalname=name)


def test_marker_plugin_selects_gpu_backends_on_cpu_tensors():
    assert is_emulated(_item({"backend": "triton", "device": "cpu", "dtype": "float32"}))
    assert is_emulated(_item({"backend": "cuda", "device": "cpu"}))
    assert not is_emulated(_item({"backend": "cpu", "device": "cpu"}))
    assert not is_emulated(_item({"backend": "triton", "device": "cuda"}))  # a real GPU
    assert not is_emulated(_item({"dtype": "float64"}))
    assert not is_emulated(_item())
    assert is_emulated(_item(module="test_cuda_emulation.py", name="test_atomics"))
    assert is_emulated(_item(module="test_selfcheck.py", name="test_cli_check_passes_under_the_interpreter"))


def test_marker_plugin_deselects_only_those_from_a_collection():
    command = [sys.executable, "-m", "pytest", "-p", "plugins.markers", "--collect-only", "-q", "-p",
               "no:cacheprovider", "tests/test_sensitivity.py"]
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    root = os.path.dirname(TESTS)

    def collect(*extra):
        out = subprocess.run(command + list(extra), cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return [line for line in out.stdout.splitlines() if "::" in line]

    everything, quick = collect(), collect("-m", "not emulated")
    slow = set(everything) - set(quick)
    assert quick and slow and set(quick) < set(everything)
    assert all("triton-cpu" in test or "cuda-cpu" in test for test in slow)
    assert not any("triton-cpu" in test or "cuda-cpu" in test for test in quick)
