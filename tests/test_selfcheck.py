"""`python -m neuronml_fast check` (neuronml_fast.selfcheck) and `make gpu-check` (bench/gpu_check.py).

The self-check must pass on the backends usable here, and it must catch a broken kernel: a
perturbed output or gradient is a MISMATCH, an unwritten element (NaN poison) too, and a kernel
that raises is an ERROR row while the run goes on. gpu_check's plumbing runs here without a GPU.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import selfcheck
from neuronml_fast.__main__ import main as cli_main

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_USABLE = "cpu" in nf.backends.status("cpu").devices
needs_cpu_backend = pytest.mark.skipif(not CPU_USABLE, reason="the C++ CPU extension is not built")


def _patch_kernel(monkeypatch, op, backend, wrap):
    """Route ``backends.kernel(op, backend)`` through ``wrap(real_entry_point)``."""
    real_kernel = nf.backends.kernel

    def kernel(name, which):
        entry = real_kernel(name, which)
        return wrap(entry) if (name, which) == (op, backend) else entry

    monkeypatch.setattr(nf.backends, "kernel", kernel)


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
    def wrap(entry):
        def perturbed(weight, grad, bias, grad_bias, sensitivity, taylor):
            entry(weight, grad, bias, grad_bias, sensitivity, taylor)
            sensitivity.mul_(1.001)  # 0.1 %: ten times float32's tolerance

        return perturbed

    _patch_kernel(monkeypatch, "neuron_sensitivity", "cpu", wrap)
    assert cli_main(["check", "--backend", "cpu", "--op", "neuron_sensitivity", "--op", "masked_linear"]) == 1
    out = capsys.readouterr().out
    sensitivity = [line for line in out.splitlines() if line.startswith("neuron_sensitivity")]
    assert sensitivity and all("MISMATCH" in line and "worst: out" in line for line in sensitivity)
    linear = [line for line in out.splitlines() if line.startswith("masked_linear")]
    assert linear and all(line.endswith(" ok") for line in linear)
    assert "FAILED" in out.splitlines()[-1]


@needs_cpu_backend
def test_perturbed_gradient_is_a_mismatch(monkeypatch):
    def wrap(entry):
        def perturbed(*args):
            grad_input, grad_weight, grad_bias, grad_mask = entry(*args)
            if grad_weight.numel():
                grad_weight = grad_weight + 1e-3 * grad_weight.abs().max()
            return grad_input, grad_weight, grad_bias, grad_mask

        return perturbed

    _patch_kernel(monkeypatch, "masked_linear_backward", "cpu", wrap)
    rows = selfcheck.run(["cpu"], functions={"masked_linear"})
    assert rows and all(r.result == "MISMATCH" for r in rows)
    assert all(r.worst in ("d weight", "d2 weight", "d2 input", "d2 mask") for r in rows), [r.worst for r in rows]
    assert all(r.output_error < 1e-5 for r in rows)  # the forward is untouched
    assert not selfcheck.passed(rows)


@needs_cpu_backend
def test_unwritten_element_is_caught_by_the_nan_poison(monkeypatch):
    def wrap(entry):
        def forgetful(weight, grad, bias, grad_bias, sensitivity, taylor):
            full = torch.empty_like(sensitivity)
            entry(weight, grad, bias, grad_bias, full, taylor)
            sensitivity[:-1].copy_(full[:-1])  # the last neuron is never written

        return forgetful

    _patch_kernel(monkeypatch, "neuron_sensitivity", "cpu", wrap)
    rows = selfcheck.run(["cpu"], functions={"neuron_sensitivity"})
    assert rows and all(r.result == "MISMATCH" and r.note == "NaN" and r.worst == "out" for r in rows)


@needs_cpu_backend
def test_raising_kernel_is_an_error_row_and_the_run_goes_on(monkeypatch, capsys):
    def wrap(entry):
        def broken(*args):
            raise RuntimeError("injected kernel failure")

        return broken

    _patch_kernel(monkeypatch, "plastic", "cpu", wrap)
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


# ---- make gpu-check -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would build and run everything")
def test_gpu_check_plumbing_without_a_gpu(tmp_path):
    # Without the Triton interpreter and the CUDA emulation the check step stays short.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NEURONML_FAST_CUDA_EMULATE")}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--no-gpu-ok", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {s["name"]: (s["status"], s["reason"]) for s in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == list(gpu_check.STEPS)
    for name in ("env", "report", "check"):
        assert status[name][0] == "ok", name
    for name in gpu_check.GPU_STEPS:
        assert status[name] == ("skipped", "no GPU"), name
    for name in ("gpu-check.log", "gpu-check.md", "check.json", "check.log", "report.log"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "check.json").read_text())["ok"]


def test_gpu_check_fails_without_a_gpu_unless_told(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe_gpu", lambda python: {"gpu": False, "error": "none here"})
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "build"]) == 1
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["failed"] == ["gpu"]
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("gpu", "FAIL"), ("build", "skipped")]


def test_gpu_check_times_out_a_step_and_goes_on(tmp_path, monkeypatch):
    """Failing and hung steps are recorded and the later steps still run; the budget skips the rest."""
    py = sys.executable
    fake = {
        "env": ([py, "-c", "import time; print('started', flush=True); time.sleep(60)"], {}, True, None),
        "build": ([py, "-c", "import sys; print('compile error'); sys.exit(3)"], {}, False, None),
        "report": ([py, "-c", "print('report ok')"], {}, True, None),
        "check": ([py, "-c", "print('never runs')"], {}, True, "a reason to skip"),
    }
    monkeypatch.setattr(gpu_check, "probe_gpu", lambda python: {"gpu": True, "name": "fake", "capability": "9.0"})
    monkeypatch.setattr(gpu_check, "commands", lambda args, gpu: fake)
    monkeypatch.setitem(gpu_check.TIMEOUTS, "env", 1)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0)
    code = gpu_check.main(["--out", str(tmp_path), "--steps", "env,build,report,check"])
    assert code == 1
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == "TIMEOUT" and steps["env"]["seconds"] < 15
    assert steps["build"]["status"] == "FAIL" and steps["build"]["rc"] == 3
    assert steps["report"]["status"] == "ok" and steps["report"]["last_line"] == "report ok"
    assert (steps["check"]["status"], steps["check"]["reason"]) == ("skipped", "a reason to skip")
    assert summary["failed"] == ["env", "build"]
    assert "compile error" in (tmp_path / "build.log").read_text()
    assert "FAILED: env, build" in (tmp_path / "gpu-check.md").read_text()


def test_gpu_check_budget_skips_late_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe_gpu", lambda python: {"gpu": True, "name": "fake", "capability": "9.0"})
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "report", "--budget", "1"]) == 0
    step = json.loads((tmp_path / "gpu-check.json").read_text())["steps"][0]
    assert step["status"] == "skipped" and step["reason"].startswith("time budget spent")


def test_gpu_check_commands_for_an_h200(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    args = gpu_check.parse(["--out", str(tmp_path), "--jobs", "16"])
    plan = gpu_check.commands(args, {"gpu": True, "name": "NVIDIA H200", "capability": "9.0",
                                     "modules": ["pytest", "hypothesis", "xdist"]})
    assert set(plan) == set(gpu_check.STEPS)
    build, build_env, _, skip = plan["build"]
    assert build[1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."]
    assert build_env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build_env["MAX_JOBS"] == "16" and skip is None
    assert build_env["NEURONML_FAST_CUDA_EXT"] == "1"  # a GPU box without the CUDA extension is a failure
    assert build_env["NEURONML_FAST_CUDA_EMULATED_EXT"] == "0"  # the emulation is for machines without a GPU
    tests, tests_env, _, skip = plan["tests"]
    assert tests[tests.index("-k") + 1] == "triton or cuda" and tests[-2:] == ["-n", "4"] and skip is None
    assert tests[tests.index("-m", 3) + 1] == "not aot" and tests_env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    no_pytest = gpu_check.commands(args, {"gpu": True, "capability": "9.0", "modules": ["hypothesis"]})["tests"]
    assert no_pytest[3].startswith("pytest not installed")
    for tool in ("memcheck", "racecheck"):
        command = plan[tool][0]
        assert command[command.index("--tool") + 1] == tool and "--error-exitcode" in command
        assert command[-7:] == ["neuronml_fast", "check", "--backend", "cuda", "--device", "cuda", "--quick"]
    bench = plan["bench"][0]
    assert bench[1:3] == ["-m", "bench"] and bench[bench.index("--out") + 1] == str(tmp_path)


def test_gpu_check_bench_command_selects_one_case_per_pattern(tmp_path):
    """The bench step's arguments parse, and each pattern still names exactly one case of bench/cases.py."""
    from bench.cases import select

    for pattern in gpu_check.BENCH_CASES:
        assert len(select([pattern])) == 1, pattern
    args = gpu_check.parse(["--out", str(tmp_path)])
    command = gpu_check.commands(args, {"gpu": True, "capability": "9.0"})["bench"][0]
    out = subprocess.run([*command, "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(out.stdout.split("\n")) - 1 == len(gpu_check.BENCH_CASES)


def test_gpu_check_step_that_cannot_start_fails(tmp_path):
    log = gpu_check.Log(str(tmp_path))
    step = gpu_check.run_command(gpu_check.Step("memcheck"), [str(tmp_path / "no-such-tool")], log, 5)
    log.close()
    assert (step.status, step.rc) == ("FAIL", 127) and "could not start" in step.reason
    assert "FAIL (exit 127)" in (tmp_path / "gpu-check.log").read_text()
