"""`make gpu-check` (bench/gpu_check.py): its plumbing, its plan for a GPU box and its step runner, here
without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_gpu_check_launches_command_selects_the_plastic_cases(tmp_path):
    """The launches step's arguments parse and name the plastic cases of bench/launches.py; the step
    counts on the CPU and measures on the GPU within its own budget, inside the step's timeout."""
    from bench import launches

    args = gpu_check.parse(["--out", str(tmp_path)])
    command = gpu_check.commands(args, {"gpu": True, "capability": "9.0"})["launches"][0]
    assert command[1:5] == ["-m", "bench.launches", "--device", "cuda"]
    assert float(command[command.index("--budget") + 1]) < gpu_check.TIMEOUTS["launches"]
    assert command[command.index("--json") + 1] == str(tmp_path / "launches.json")
    listed = subprocess.run([*command, "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    plastic = [c.name for c in launches.CASES if c.family == "plastic"]
    assert listed.stdout.split("\n")[:-1] == plastic
    # the cases (every rule of the table), the 16-bit ones beside them
    assert {"plastic_rnn T=100 N=64 hebb", "plastic_rnn T=106 N=1001 B=1 hebb (Miconi)", "plastic_rnn T=100 N=64 clip 1",
            "plastic_rnn T=120 N=100 B=30 endogenous clip 1 (backpropamine)"} <= set(plastic)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU it would run")
def test_launches_on_a_gpu_without_one_is_a_clear_failure():
    from bench import launches

    out = subprocess.run([sys.executable, "-m", "bench.launches", "--device", "cuda", "--cases", "N=64 hebb"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no CUDA device visible to torch" in out.stderr
    assert launches.GPU_BACKENDS == ("triton", "cuda")


def test_gpu_measurement_table_puts_the_cpu_count_beside_the_gpu_figures():
    from bench import launches

    cpu = {"launches": 219, "model_us": 1095.0}
    rows = [{"case": "plastic_rnn T=100 N=64 hebb", "path": "triton", "cpu": cpu, "cuda_kernels": 230,
             "cuda_copies": 2, "median_us": 1500.0},
            {"case": "plastic_rnn T=100 N=64 hebb", "path": "cuda", "cpu": None, "skipped": "the 50 s budget is spent"}]
    table = launches.gpu_table(rows).splitlines()
    assert table[2] == "| plastic_rnn T=100 N=64 hebb | triton | 219 | 230 | 2 | 1500 | 1095 |"
    assert "skipped: the 50 s budget is spent" in table[3]


def test_gpu_check_step_that_cannot_start_fails(tmp_path):
    log = gpu_check.Log(str(tmp_path))
    step = gpu_check.run_command(gpu_check.Step("memcheck"), [str(tmp_path / "no-such-tool")], log, 5)
    log.close()
    assert (step.status, step.rc) == ("FAIL", 127) and "could not start" in step.reason
    assert "FAIL (exit 127)" in (tmp_path / "gpu-check.log").read_text()
