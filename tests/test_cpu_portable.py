"""The CPU extension built here runs on another x86-64 CPU: the AVX2/FMA kernels where that CPU has
them, the portable loops where it has not (no AVX instruction may execute there). Checked by running
the installed package under qemu-x86_64's user-mode emulation of older and newer CPU models:
Nehalem (SSE4.2, no AVX), SandyBridge (AVX without AVX2: the AVX2 kernels must still not be
chosen) and Haswell (AVX2 and FMA). The check script runs without NumPy, so a NumPy release
with a newer ISA baseline cannot fail it."""

import os
import platform
import shutil
import subprocess
import sys

import pytest

from neuronml_fast import _extensions

QEMU = shutil.which("qemu-x86_64")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "portable_cpu_check.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 CPU models only"),
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (Debian: qemu-user)"),
    pytest.mark.skipif(_extensions.cpu() is None, reason="the CPU extension is not built here"),
]


@pytest.mark.parametrize("model,expected", [("Nehalem", "baseline"), ("SandyBridge", "baseline"),
                                            ("Haswell", "avx2")])
def test_the_build_runs_on_a_cpu_model_with_and_without_avx2(model, expected):
    if _extensions.cpu().compiled_with_avx:
        pytest.skip("built with NEURONML_FAST_MARCH for this machine only")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "NEURONML_FAST_"))}
    out = subprocess.run([QEMU, "-cpu", model, sys.executable, SCRIPT], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, f"under a {model} CPU:\n{out.stdout}\n{out.stderr[-3000:]}"
    assert f"vector_isa: {expected}" in out.stdout, out.stdout
