"""`python -m neuronml_fast check` (neuronml_fast.selfcheck); `make gpu-check` is tested in bench/tests.

The self-check must pass on the backends usable here, and it must catch a broken kernel: a
perturbed output or gradient is a MISMATCH, an unwritten element (NaN poison) too, and a kernel
that raises is an ERROR row while the run goes on.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import _alloc, selfcheck
from neuronml_fast.__main__ import main as cli_main
from neuronml_fast.ops.masked import cpu as masked_cpu
from neuronml_fast.ops.plastic import cpu as plastic_cpu
from neuronml_fast.ops.sensitivity import cpu as sensitivity_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_USABLE = "cpu" in nf.backends.status("cpu").devices
needs_cpu_backend = pytest.mark.skipif(not CPU_USABLE, reason="the C++ CPU extension is not built")


def _patch_launcher(monkeypatch, module, name, wrap):
    """Route the launcher ``module.name`` (what ``backends.launchers(op, backend).name`` calls) through
    ``wrap(real_launcher)``."""
    monkeypatch.setattr(module, name, wrap(getattr(module, name)))


def _rows(result, **where):
    return [r for r in result if all(getattr(r, k) == v for k, v in where.items())]


# ---- the case table --------------------------------------------------------------------------


def test_every_registered_op_has_a_case():
    assert selfcheck.uncovered_ops() == []


def test_every_float_dtype_has_a_tolerance():
    assert set(selfcheck.TOLERANCES) == set(nf.backends.FLOAT_DTYPES)


def test_cases_cover_what_the_brief_names():
    names = " | ".join(f"{c.function}: {c.name}" for c in selfcheck.CASES)
    for needed in ("pruned", "tasks", "groups", "no bias", "2nd order", "oja", "modulated", "clip",
                   "plastic_linear", "plastic_rnn", "trace kept every", "segments"):
        assert needed in names, needed


# ---- passing -------------------------------------------------------------------------------


@needs_cpu_backend
def test_check_passes_on_reference_and_cpu_backends():
    rows = selfcheck.run(["reference", "cpu"])
    failed = [selfcheck.format_row(r) for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    assert {r.backend for r in rows} == {"reference", "cpu"}
    assert {r.dtype for r in _rows(rows, backend="cpu")} == {"fp32", "fp64"}  # as registered
    assert {r.dtype for r in _rows(rows, backend="reference")} == {"fp16", "bf16", "fp32", "fp64"}
    assert selfcheck.passed(rows)


def test_cli_check_passes_under_the_interpreter(tmp_path):
    """Named without 'triton': gpu-check's pytest step selects -k 'triton or cuda'."""
    path = tmp_path / "check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "NEURONML_FAST_POISON": "1"}
    out = subprocess.run([sys.executable, "-m", "neuronml_fast", "check", "--quick", "--json", str(path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].endswith("all ok")
    rows = json.loads(path.read_text())["rows"]
    checked = {r["backend"] for r in rows if r["result"] == "ok"}
    assert {"reference", "triton"} <= checked and ("cpu" in checked) == CPU_USABLE
    # bf16 on the interpreter is a documented skip, neither a pass nor a failure.
    skipped = {(r["backend"], r["dtype"]) for r in rows if r["result"] == "skip"}
    assert skipped == {("triton", "bf16")}


# ---- catching broken kernels ----------------------------------------------------------------


@needs_cpu_backend
def test_perturbed_output_is_a_mismatch(monkeypatch, capsys):
    def wrap(launcher):
        def perturbed(*args):
            sensitivity, taylor = launcher(*args)
            return sensitivity * 1.001, taylor  # 0.1 %: ten times float32's tolerance

        return perturbed

    _patch_launcher(monkeypatch, sensitivity_cpu, "neuron_sensitivity", wrap)
    assert cli_main(["check", "--backend", "cpu", "--op", "neuron_sensitivity", "--op", "masked_linear"]) == 1
    out = capsys.readouterr().out
    sensitivity = [line for line in out.splitlines() if line.startswith("neuron_sensitivity")]
    assert sensitivity and all("MISMATCH" in line and "worst: out" in line for line in sensitivity)
    linear = [line for line in out.splitlines() if line.startswith("masked_linear")]
    assert linear and all(line.endswith(" ok") for line in linear)
    assert "FAILED" in out.splitlines()[-1]


@needs_cpu_backend
def test_perturbed_gradient_is_a_mismatch(monkeypatch):
    def wrap(launcher):
        def perturbed(*args):
            grad_input, grad_weight, grad_bias, grad_mask = launcher(*args)
            if grad_weight.numel():
                grad_weight = grad_weight + 1e-3 * grad_weight.abs().max()
            return grad_input, grad_weight, grad_bias, grad_mask

        return perturbed

    _patch_launcher(monkeypatch, masked_cpu, "linear_backward", wrap)
    rows = selfcheck.run(["cpu"], functions={"masked_linear"})
    assert rows and all(r.result == "MISMATCH" for r in rows)
    assert all(r.worst in ("d weight", "d2 weight", "d2 input", "d2 mask") for r in rows), [r.worst for r in rows]
    assert all(r.output_error < 1e-5 for r in rows)  # the forward is untouched
    assert not selfcheck.passed(rows)


@needs_cpu_backend
def test_unwritten_element_is_caught_by_the_nan_poison(monkeypatch):
    def wrap(launcher):
        def forgetful(*args):
            full, taylor = launcher(*args)
            sensitivity = _alloc.empty(full.shape, dtype=full.dtype, device=full.device)
            sensitivity[:-1].copy_(full[:-1])  # the last neuron is never written
            return sensitivity, taylor

        return forgetful

    _patch_launcher(monkeypatch, sensitivity_cpu, "neuron_sensitivity", wrap)
    rows = selfcheck.run(["cpu"], functions={"neuron_sensitivity"})
    assert rows and all(r.result == "MISMATCH" and r.note == "NaN" and r.worst == "out" for r in rows)


@needs_cpu_backend
def test_raising_kernel_is_an_error_row_and_the_run_goes_on(monkeypatch, capsys):
    def wrap(launcher):
        def broken(*args):
            raise RuntimeError("injected kernel failure")

        return broken

    _patch_launcher(monkeypatch, plastic_cpu, "plastic_forward", wrap)
    code = cli_main(["check", "--backend", "cpu", "--quick", "--op", "plastic_rnn", "--op", "neuron_sensitivity"])
    out = capsys.readouterr().out
    assert code == 1
    plastic = [line for line in out.splitlines() if line.startswith("plastic_rnn")]
    assert plastic and all("ERROR" in line and "RuntimeError: injected kernel failure" in line for line in plastic)
    after = [line for line in out.splitlines() if line.startswith("neuron_sensitivity")]
    assert after and all(line.endswith(" ok") for line in after)
    assert "Traceback" not in out


def test_unusable_backend_asked_for_is_a_failing_row(monkeypatch, capsys):
    real_status = nf.backends.status

    def status(name=None):
        if name == "cuda":
            return nf.backends.Status("cuda", "built (no device)", frozenset(), "no CUDA device visible")
        return real_status(name)

    monkeypatch.setattr(nf.backends, "status", status)
    assert selfcheck.main(["--backend", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "UNAVAILABLE  built (no device) (no CUDA device visible)" in out and "FAILED" in out


def test_bad_dtype_names_the_argument(capsys):
    with pytest.raises(SystemExit):
        selfcheck.main(["--dtype", "fp8"])
    assert "--dtype: expected one of fp16, bf16, fp32, fp64, got 'fp8'" in capsys.readouterr().err


def test_default_command_still_prints_the_report(capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("neuronml_fast environment") and "which backend 'auto' runs" in out


@needs_cpu_backend
def test_json_output(tmp_path):
    path = tmp_path / "check.json"
    assert selfcheck.main(["--backend", "cpu", "--op", "batch_norm_rows", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["ok"] and {r["dtype"] for r in data["rows"]} == {"fp32", "fp64"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_device_asked_for_that_is_missing_is_a_failing_row_with_the_reason(capsys):
    assert selfcheck.main(["--device", "cuda", "--quick"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "UNAVAILABLE" in line)
    assert "no cuda device here (torch.cuda.is_available() is False" in row
    if "cpu" in nf.backends.status("cuda").devices:  # the emulation runs the CUDA kernels on cpu tensors
        assert "run their GPU kernels on cpu tensors here: --device cpu" in row
    assert "nothing checked" not in out and "FAILED" in out


def test_an_unwritable_json_path_is_a_usage_error_before_the_check(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    for path, expected in [(tmp_path / "no" / "dir" / "x.json", "--json: expected a file in an existing folder"),
                           (a_file / "x.json", f"({a_file} is a file)"),
                           (tmp_path, "--json: expected a file to write")]:
        with pytest.raises(SystemExit) as stop:
            selfcheck.main(["--json", str(path)])
        captured = capsys.readouterr()
        assert stop.value.code == 2 and expected in captured.err and str(path) in captured.err
        assert "every backend against the float64 reference" not in captured.out  # no work done
