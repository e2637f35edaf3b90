"""Backend registry, selection, environment report, and that the extensions were really built."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import _alloc, _extensions, backends


def _nvcc_present():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


@pytest.mark.skipif(not (_nvcc_present() and torch.version.cuda), reason="no nvcc or CPU-only torch: CUDA extension not expected")
def test_cuda_extension_was_built():
    # A kernel that stops compiling must fail CI, not quietly drop the backend.
    assert _extensions.cuda() is not None, _extensions.error("_C_cuda")
    assert backends.status("cuda").state in ("available", "built (no device)")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_cpu_extension_was_built():
    assert _extensions.cpu() is not None, _extensions.error("_C_cpu")
    assert "cpu" in nf.backends.available()


def test_the_plastic_rule_codes_are_one_fact():
    # csrc/common/plastic_rule.h for the C++ and CUDA kernels, ops/plastic/rules.py for the Python
    # launchers and the Triton kernels: every compiled extension exports its codes.
    from neuronml_fast.ops.plastic import rules

    python = {**rules.RULE_CODES, "modulated": rules.MODULATED}
    for name in ("_C_cpu", "_C_cuda", "_C_cuda_emulated"):
        module = _extensions.load(name)
        if module is not None:
            assert dict(module.PLASTIC_RULE_CODES) == python, name


def test_the_cuda_launchers_read_the_kernels_constants():
    module = _extensions.load("_C_cuda_emulated") or _extensions.load("_C_cuda")
    if module is None:
        pytest.skip("no CUDA extension built")
    # 16-deep K steps (the plastic kernels plan their own blocks: plastic_plan).
    assert module.MASKED_K_STEP == 16


def test_available_lists_known_backends_in_order():
    names = nf.backends.available()
    assert names[0] == "reference"
    assert names == [b for b in backends.BACKENDS if b in names]


def test_set_backend_and_use_backend():
    nf.set_backend("reference")
    assert nf.get_backend() == "reference"
    with nf.use_backend("auto"):
        assert nf.get_backend() == "auto"
    assert nf.get_backend() == "reference"


def test_use_backend_restores_after_an_error():
    nf.set_backend("auto")
    with pytest.raises(ZeroDivisionError):
        with nf.use_backend("reference"):
            1 / 0
    assert nf.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["gpu", "", "CPU", None, 3])
def test_unknown_backend_name_is_rejected(bad):
    with pytest.raises(ValueError, match="backend: expected one of"):
        nf.set_backend(bad)


def test_auto_prefers_compiled_cpu_then_reference():
    if "cpu" in nf.backends.available():
        assert backends.resolve("neuron_sensitivity", "cpu", torch.float32, requested="auto") == "cpu"
    # no CPU kernel for bf16: the documented fallback
    assert backends.resolve("neuron_sensitivity", "cpu", torch.bfloat16, requested="auto") == "reference"


def test_gpu_order_puts_tensor_cores_first_then_the_cheaper_launch(monkeypatch):
    # masked: both GPU backends on tensor cores in the 16-bit dtypes and float32 (TF32): the CUDA
    # C++ launch is the cheaper one; float64 only the CUDA C++ kernels run on DMMA.
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        order, reason = backends.gpu_order("masked", dtype)
        assert order == ("cuda", "triton") and reason.startswith("both on tensor cores") and "cheaper launch" in reason
    assert backends.gpu_order("masked", torch.float64) == (("cuda", "triton"),
                                                           "cuda runs the GEMMs on tensor cores, triton on FMA")
    # the order follows the facts, not a list: a family whose Triton kernels alone had tensor cores
    monkeypatch.setitem(backends.TENSOR_CORES, "sensitivity", {"triton": frozenset({torch.float16})})
    assert backends.gpu_order("sensitivity", torch.float16)[0] == ("triton", "cuda")
    assert backends.gpu_order("sensitivity", torch.float32)[0] == ("cuda", "triton")
    assert backends.gpu_order("batch_norm", torch.float32) == (("triton",), "only triton has a GPU kernel (CUDA cores)")
    assert backends.auto_order("neuron_sensitivity", "cuda", torch.float16) == ("triton", "cuda", "reference")
    assert backends.auto_order("neuron_sensitivity", "cpu", torch.float16) == backends.AUTO_ORDER["cpu"]
    plan = backends.plan(assume_device=True)
    if backends._built_for_gpu("triton") and not backends._built_for_gpu("cuda"):
        assert plan[("neuron_sensitivity", "cuda", torch.float16)] == "triton"


def test_the_report_gives_auto_s_order_on_cuda_and_its_reason():
    from neuronml_fast.__main__ import report

    text = report()
    assert "auto's order on CUDA tensors and why" in text
    assert "masked_conv2d          fp64 cuda > triton > reference: cuda runs the GEMMs on tensor cores" in text


def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run neuron_sensitivity on meta tensors"):
        backends.resolve("neuron_sensitivity", "meta", torch.float32, requested="cuda")


def test_explicit_backend_with_unsupported_dtype_raises():
    if "cpu" not in nf.backends.available():
        pytest.skip("cpu backend not built")
    with pytest.raises(TypeError, match=r"backend 'cpu' expected dtype in .*got torch.bfloat16"):
        backends.resolve("neuron_sensitivity", "cpu", torch.bfloat16, requested="cpu")


def test_env_variable_selects_backend():
    code = "import neuronml_fast as nf; print(nf.get_backend())"
    env = dict(os.environ, NEURONML_FAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_env_variable_with_unknown_backend_names_the_variable_and_leaves_the_import_and_the_report_working():
    env = dict(os.environ, NEURONML_FAST_BACKEND="fastest")
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import neuronml_fast as nf
print([str(w.message) for w in caught if w.category is nf.BackendWarning])
try:
    nf.neuron_sensitivity(torch.ones(2, 3), torch.ones(2, 3))
except ValueError as error:
    print("op:", error)
nf.set_backend("reference")  # a valid choice in the program replaces the bad one
print("after set_backend:", nf.neuron_sensitivity(torch.ones(2, 3), torch.ones(2, 3)).tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = "NEURONML_FAST_BACKEND: expected one of 'auto', 'reference', 'cpu', 'triton', 'cuda', got 'fastest'"
    warning, op, after = out.stdout.strip().splitlines()
    assert expected in warning and expected in op and op.startswith("op: ")
    assert after == "after set_backend: [3.0, 3.0]"
    report = subprocess.run([sys.executable, "-m", "neuronml_fast"], env=env, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    line = next(line for line in report.stdout.splitlines() if "requested backend" in line)
    assert "'fastest'  <- NOT a backend" in line and expected in line
    assert "which backend 'auto' runs" in report.stdout


def test_environment_report_names_every_backend():
    out = subprocess.run([sys.executable, "-m", "neuronml_fast"], capture_output=True, text=True, check=True).stdout
    for name in backends.BACKENDS:
        assert f"\n  {name} " in out
    assert "torch" in out and "triton" in out and "nvcc" in out
    assert "neuron_sensitivity" in out
    if _extensions.cpu() is not None:
        assert "\n  cpu        available" in out
        kernel = ("the faster of the own AVX2 kernels and oneDNN" if _extensions.cpu().conv_grad_available()
                  else "oneDNN (AVX2/FMA kernels not")
        assert f"masked_conv2d input and weight gradients: {kernel}" in out
        assert f"masked conv dense kernels: NEURONML_FAST_CPU_CONV={_extensions.cpu().conv_policy()}: " in out


def test_poisoned_allocation_is_nan():
    with _alloc.poisoned():
        assert torch.isnan(_alloc.empty((4,), dtype=torch.float32, device="cpu")).all()
    assert _alloc.poisoning()  # conftest turns poisoning on for the whole suite
