"""An install cannot silently degrade: a build without torch fails with the instruction instead of
installing a reference-only package, and an import that finds a compiled backend missing says so
in one warning line."""

import os
import re
import subprocess
import sys

import pytest

from neuronml_fast import _extensions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCHES = ("NEURONML_FAST_CPU_EXT", "NEURONML_FAST_CUDA_EXT", "NEURONML_FAST_CUDA_EMULATED_EXT")


def _setup_without_torch(tmp_path, **switches):
    (tmp_path / "torch.py").write_text('raise ImportError("no torch in this build environment")\n')
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(PYTHONPATH=str(tmp_path), **switches)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_build_without_torch_fails_with_the_instruction(tmp_path):
    out = _setup_without_torch(tmp_path)
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in out.stderr + out.stdout


def test_a_pure_python_build_must_be_asked_for(tmp_path):
    out = _setup_without_torch(tmp_path, **{name: "0" for name in SWITCHES})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "neuronml_fast"


def test_the_package_metadata_raises_no_deprecation_warning():
    """setuptools warns about a license classifier beside an SPDX `license` (PEP 639) in every
    build: the metadata states the license once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert not re.search("deprecat", out.stdout + out.stderr, re.I), out.stderr


def _import_warnings(code):
    out = subprocess.run([sys.executable, "-c", code + "\nimport neuronml_fast"], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert out.returncode == 0, out.stderr
    return [line for line in out.stderr.splitlines() if "BackendWarning" in line]


def test_a_missing_cpu_extension_is_one_warning_line_at_import():
    lines = _import_warnings("import sys; sys.modules['neuronml_fast._C_cpu'] = None")
    assert len(lines) == 1 and "cpu: not built" in lines[0] and "--no-build-isolation" in lines[0]


@pytest.mark.skipif(_extensions.cpu() is None, reason="the CPU extension is not built here")
def test_a_complete_install_imports_without_warnings():
    assert _import_warnings("") == []


def test_the_sdist_holds_everything_a_build_needs(tmp_path):
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path), "--formats=gztar"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    import tarfile

    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("csrc/cuda/common.cuh", "csrc/cuda/masked.h", "csrc/cpu/transpose.h", "csrc/emu/cuda_emu.h",
                   "csrc/emu/include/cuda_runtime.h", "csrc/emu/translate.py", "kernels/masked.py", "LICENSE",
                   "docs/SPEC.md", "setup.py", "pyproject.toml"):
        assert needed in names, f"{needed} is missing from the sdist"


def test_the_version_has_one_source():
    import neuronml_fast

    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == neuronml_fast.__version__


def test_the_repository_contract_is_in_step_with_the_shared_one():
    shared = os.path.join(ROOT, "..", "shared", "SPEC.md")
    if not os.path.exists(shared):
        pytest.skip("no ../shared/SPEC.md beside this checkout")
    with open(shared) as a, open(os.path.join(ROOT, "docs", "SPEC.md")) as b:
        shared_text, ours = a.read(), b.read()
    # Our copy may carry blocks marked as proposed extensions (not yet in the shared contract);
    # everything else is the shared text, byte for byte.
    extension = re.compile(r"\n<!-- repository extension: proposed for the shared contract -->\n.*?"
                           r"<!-- /repository extension -->\n", re.S)
    assert extension.sub("", ours) == shared_text, "docs/SPEC.md differs from ../shared/SPEC.md: copy the contract over"


@pytest.mark.skipif(__import__("torch").version.cuda is None, reason="a CPU-only torch builds no CUDA extension")
def test_an_nvcc_of_another_cuda_major_skips_only_the_cuda_extension(tmp_path):
    import torch

    other = int(torch.version.cuda.split(".")[0]) - 1
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.4, V{other}.4.99'\n")
    nvcc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env["CUDA_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"skipping the CUDA extension: nvcc is CUDA {other}.4 but torch was built with CUDA" in out.stderr
    env["NEURONML_FAST_CUDA_EXT"] = "1"
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and f"nvcc is CUDA {other}.4" in out.stderr
