"""The compiled CUDA extension as it ships: machine code for the default architectures and PTX
that any newer GPU can compile at load time (without it: "no kernel image is available")."""

import importlib.util
import os
import shutil
import subprocess

import pytest

import triton  # noqa: F401  (ships a cuobjdump when the CUDA toolkit does not)


def _cuobjdump():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for candidate in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump"), bundled):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _extension_path():
    spec = importlib.util.find_spec("neuronml_fast._C_cuda")
    return spec.origin if spec is not None else None


@pytest.mark.skipif(_extension_path() is None, reason="the CUDA extension is not built here (no nvcc)")
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump to read the fatbinary")
@pytest.mark.skipif("TORCH_CUDA_ARCH_LIST" in os.environ, reason="built for an explicit TORCH_CUDA_ARCH_LIST")
def test_the_default_build_ships_sm80_sm90_code_and_sm90_ptx():
    def listing(flag):
        out = subprocess.run([_cuobjdump(), flag, _extension_path()], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    elf, ptx = listing("--list-elf"), listing("--list-ptx")
    assert "sm_80" in elf and "sm_90" in elf, elf
    assert "sm_90" in ptx, f"no PTX in the fatbinary: a GPU newer than sm_90 could not load it\n{ptx}"
