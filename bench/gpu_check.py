"""`make gpu-check OUT=<folder>`: build, test, self-check, sanitize and time the package on a GPU box.

For an H100/H200 machine with torch, triton, nvcc (and compute-sanitizer) preinstalled and no
network. One command, each step time-boxed, the whole run inside a time budget (default 7.5
minutes); a failing step does not stop the next. Steps:

  env        versions of python, torch, triton, nvcc, compute-sanitizer; nvidia-smi
  build      pip install --no-build-isolation --no-deps --no-index -e . (editable: the Triton
             kernels live in kernels/ and import as neuronml_fast.kernels only through an
             install), for this GPU's architecture only, without the CPU emulation of the
             CUDA kernels, MAX_JOBS=16
  report     python -m neuronml_fast
  check      python -m neuronml_fast check (every backend against float64, NaN-poisoned)
  memcheck   compute-sanitizer --tool memcheck on a quick check of the cuda backend (every
             CUDA kernel, every dtype)
  racecheck  compute-sanitizer --tool racecheck, same
  bench      python -m bench on a few GPU cases: eager reference vs triton vs cuda
  launches   python -m bench.launches --device cuda on the plastic cases: each path's CUDA
             kernels per fwd+bwd (torch.profiler) and its time, beside the launches the counter
             finds on the CPU and the time its H100 model implies
  tests      pytest -k "triton or cuda" (skipped, with a line saying so, where pytest or
             hypothesis is missing)

Without a GPU the GPU steps (build, tests, sanitizers, bench) are reported as skipped and the
run fails, unless ``--no-gpu-ok`` (to check this script's plumbing on a CPU machine).

Writes under the output folder (default bench/out/gpu-check/): gpu-check.log (everything),
<step>.log per step, gpu-check.json and gpu-check.md (the summary), check.json (the self-check
rows), pytest.xml, the bench's gpu.md, gpu.json, gpu.csv and plots, and launches.json. Exit status 1 if any step
failed or timed out.
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "out", "gpu-check")
# The open-ended step (the test suite, its Triton compiles) last: the others have fixed costs, and
# what the budget leaves goes to it.
STEPS = ("env", "build", "report", "check", "memcheck", "racecheck", "bench", "launches", "tests")
GPU_STEPS = frozenset({"build", "tests", "memcheck", "racecheck", "bench", "launches"})
# Upper bounds per step, seconds; the budget caps their sum.
TIMEOUTS = {"env": 60, "build": 240, "report": 60, "check": 150, "memcheck": 90, "racecheck": 90, "bench": 120,
            "launches": 120, "tests": 300}
MIN_STEP_S = 15  # a step that would get less than this is skipped: its timeout would only truncate it
KILL_GRACE_S = 10
# Bench cases (substrings of case ids, bench/cases.py) that time each op family in a minute.
BENCH_CASES = ("conv4 fwd+bwd active=100%", "conv4 fwd+bwd active=50%", "32 tasks x 16 img fwd+bwd active=50%",
               "256x1024 fwd+bwd active=50%", "resnet 512x512x3x3", "B=16 N=256 T=100 hebb fwd+bwd",
               "B=16 N=256 T=100 hebb clip=0.05",
               "B=16 N=128 T=100 modulated")
# Launch-counter cases (substrings of bench/launches.py case names) the launches step times.
LAUNCH_CASES = ("plastic_rnn",)

_PROBE = """
import importlib.util, json
import torch
gpu = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu": gpu,
                  "name": torch.cuda.get_device_name(0) if gpu else None,
                  "capability": "%d.%d" % torch.cuda.get_device_capability(0) if gpu else None,
                  "modules": [m for m in ("pytest", "hypothesis", "xdist") if importlib.util.find_spec(m)]}))
"""

_ENV = """
import importlib.util, platform, shutil, subprocess, sys
def run(*cmd):
    if not shutil.which(cmd[0]):
        print(f"{cmd[0]}: not found"); return
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    print(f"$ {' '.join(cmd)}"); print((out.stdout + out.stderr).strip())
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "pytest", "hypothesis", "xdist", "matplotlib"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"{name}: not installed"); continue
    module = __import__(name)
    print(name, getattr(module, "__version__", "installed"))
import torch
print("torch CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
run("nvidia-smi")
run("nvcc", "--version")
run("compute-sanitizer", "--version")
"""


@dataclasses.dataclass
class Step:
    name: str
    status: str = "pending"  # ok, FAIL, TIMEOUT, skipped
    reason: str = ""
    rc: int = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    last_line: str = ""

    @property
    def failed(self):
        return self.status in ("FAIL", "TIMEOUT")

    def describe(self):
        if self.status == "skipped":
            return f"skipped: {self.reason}"
        if self.status == "FAIL":
            return f"FAIL (exit {self.rc})" + (f": {self.reason}" if self.reason else "")
        if self.status == "TIMEOUT":
            return f"TIMEOUT after {self.timeout_s:.0f} s"
        return self.status


class Log:
    """Everything to the console and to gpu-check.log; a step's output also to <step>.log."""

    def __init__(self, out):
        self.out = out
        self.main = open(os.path.join(out, "gpu-check.log"), "w")
        self.lock = threading.Lock()

    def line(self, text, step_file=None, console=True):
        with self.lock:
            if console:
                print(text, flush=True)
            self.main.write(text + "\n")
            self.main.flush()
            if step_file:
                step_file.write(text + "\n")
                step_file.flush()

    def close(self):
        self.main.close()


def _kill(process):
    """End the step's whole process group: SIGTERM, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(command, env):
    # Own process group (to kill the step's children too); unbuffered, so a step killed at its
    # timeout still leaves its last lines in the log.
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)


def _pump(process, log, step_file, console, last):
    """Copy the step's output to the logs, keeping its last non-empty line in ``last[0]``."""
    for text in process.stdout:
        text = text.rstrip("\n")
        if text.strip():
            last[:] = [text.strip()]
        log.line(text, step_file, console)


def _wait(step, process, timeout_s):
    try:
        step.rc = process.wait(timeout_s)
        step.status = "ok" if step.rc == 0 else "FAIL"
    except subprocess.TimeoutExpired:
        _kill(process)
        step.status = "TIMEOUT"


def run_command(step, command, log, timeout_s, env=None, console=True):
    """Run ``command`` for ``step`` under a timeout, streaming its output to the logs."""
    step.timeout_s = timeout_s
    shown = " ".join("<script>" if "\n" in part else part for part in command)
    log.line(f"\n=== {step.name}: {shown}  (timeout {timeout_s:.0f} s)")
    start = time.monotonic()
    path = os.path.join(log.out, f"{step.name}.log")
    with open(path, "w") as step_file:
        try:
            process = _start(command, env or {})
        except OSError as exc:
            step.status, step.rc, step.reason = "FAIL", 127, f"could not start {command[0]}: {exc}"
            log.line(step.reason, step_file)
        else:
            last = []
            reader = threading.Thread(target=_pump, args=(process, log, step_file, console, last), daemon=True)
            reader.start()
            _wait(step, process, timeout_s)
            reader.join(KILL_GRACE_S)
            step.last_line = last[0][:200] if last else ""
    step.seconds = time.monotonic() - start
    if step.failed and not console:  # a quiet step (the build) shows its end when it fails
        with open(path) as f:
            print("\n".join(f.read().splitlines()[-40:]), flush=True)
    log.line(f"=== {step.name}: {step.describe()} in {step.seconds:.1f} s")
    return step


def probe_gpu(python):
    """{'gpu': bool, 'name', 'capability', 'torch', ...} from a child process (no CUDA context here)."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        return {"gpu": False, "error": f"{type(exc).__name__}: {exc}"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"gpu": False, "error": (out.stderr.strip().splitlines() or ["torch probe failed"])[-1]}
    return json.loads(lines[-1])


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = os.path.join(home, "bin", "compute-sanitizer") if home else None
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def commands(args, gpu):
    """{step: (command, env, console, skip reason or None)} for this machine."""
    py = args.python
    quick = ["--quick"] if args.quick else []
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or gpu.get("capability") or "9.0"
    # The CUDA extension is required (a GPU box without it fails here, not later); its CPU emulation
    # is for machines without a GPU, so its compile time is saved.
    build_env = {"MAX_JOBS": str(args.jobs), "TORCH_CUDA_ARCH_LIST": arch, "NEURONML_FAST_CUDA_EXT": "1",
                 "NEURONML_FAST_CUDA_EMULATED_EXT": "0", "PIP_BREAK_SYSTEM_PACKAGES": "1"}
    sanitizer = find_sanitizer()
    sanitized_check = [py, "-m", "neuronml_fast", "check", "--backend", "cuda", "--device", "cuda", "--quick"]
    modules = gpu.get("modules", [])
    missing_test_tools = [m for m in ("pytest", "hypothesis") if m not in modules]
    # Not the `aot` tests: they compile every kernel ahead of time for a machine without a GPU.
    tests = [py, "-m", "pytest", "tests", "-q", "-rfE", "-p", "no:cacheprovider", "-k", "triton or cuda",
             "-m", "not aot", f"--junitxml={os.path.join(args.out, 'pytest.xml')}"]
    if "xdist" in modules:
        tests += ["-n", "4"]
    no_sanitizer = None if sanitizer else "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    return {
        "env": ([py, "-c", _ENV], {}, True, None),
        "build": ([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."],
                  build_env, False, None),
        "report": ([py, "-m", "neuronml_fast"], {}, True, None),
        "check": ([py, "-m", "neuronml_fast", "check", *quick, "--json", os.path.join(args.out, "check.json")],
                  {"NEURONML_FAST_POISON": "1"}, True, None),
        # The tests read TORCH_CUDA_ARCH_LIST to know which architectures the build holds.
        "tests": (tests, {"NEURONML_FAST_POISON": "1", "TORCH_CUDA_ARCH_LIST": arch}, True,
                  f"{' and '.join(missing_test_tools)} not installed for {py}: no pytest run"
                  if missing_test_tools else None),
        "memcheck": ([sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                      "--print-limit", "20", *sanitized_check],
                     {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, True, no_sanitizer),
        "racecheck": ([sanitizer or "compute-sanitizer", "--tool", "racecheck", "--racecheck-report", "hazard",
                       "--error-exitcode", "1", "--print-limit", "20", *sanitized_check], {}, True, no_sanitizer),
        "bench": ([py, "-m", "bench", "--device", "cuda", "--no-compile", "--rounds", "5", "--out", args.out,
                   "--tag", "gpu", "--cases", *BENCH_CASES], {}, True, None),
        # Its own budget, inside the step's timeout: half counts on the CPU, half runs on the GPU.
        "launches": ([py, "-m", "bench.launches", "--device", "cuda", "--budget", str(TIMEOUTS["launches"] - 20),
                      "--json", os.path.join(args.out, "launches.json"), "--cases", *LAUNCH_CASES], {}, True, None),
    }


def write_summary(out, steps, gpu, seconds, budget_s):
    failed = [s.name for s in steps if s.failed]
    summary = {"ok": not failed, "failed": failed, "seconds": round(seconds, 1), "budget_s": budget_s, "gpu": gpu,
               "steps": [dataclasses.asdict(s) for s in steps]}
    with open(os.path.join(out, "gpu-check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    device = gpu.get("name") or f"no GPU ({gpu.get('error', 'torch sees none')})"
    lines = ["# gpu-check", "", f"device: {device}; torch {gpu.get('torch', '?')} (CUDA {gpu.get('torch_cuda', '?')}); "
             f"{seconds:.0f} s of a {budget_s:.0f} s budget", "",
             "| step | result | seconds | last line of its log |", "|---|---|---:|---|"]
    for s in steps:
        last = s.last_line.replace("|", "\\|")
        lines.append(f"| {s.name} | {s.describe()} | {s.seconds:.1f} | {last} |")
    lines += ["", "FAILED: " + ", ".join(failed) if failed else "all steps passed or were skipped"]
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return failed


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for logs and results (default bench/out/gpu-check)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile jobs")
    p.add_argument("--python", default=sys.executable, help="interpreter with torch (default: this one)")
    p.add_argument("--quick", action="store_true", help="quick self-check (the --quick cases)")
    p.add_argument("--no-gpu-ok", action="store_true",
                   help="without a GPU, skip the GPU steps without failing (to check the plumbing)")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"--steps: expected names from {','.join(STEPS)}, got {','.join(unknown)}")
    args.steps = steps
    args.out = os.path.abspath(args.out)
    return args


def _skip_reason(name, gpu, skip, remaining_s, budget_s):
    if name in GPU_STEPS and not gpu["gpu"]:
        return "no GPU"
    if skip:
        return skip
    if remaining_s < MIN_STEP_S:
        return f"time budget spent ({budget_s:.0f} s)"
    return ""


def main(argv=None):
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    log = Log(args.out)
    gpu = probe_gpu(args.python)
    log.line(f"gpu-check in {args.out}: " + (f"{gpu['name']} (sm {gpu['capability']})" if gpu["gpu"]
                                             else f"no GPU visible to torch ({gpu.get('error', 'none found')})"))
    plan = commands(args, gpu)
    steps = []
    if not gpu["gpu"] and not args.no_gpu_ok:
        steps.append(Step("gpu", status="FAIL", rc=1, reason="no CUDA device visible to torch"))
    for name in args.steps:
        command, env, console, skip = plan[name]
        step = Step(name)
        remaining = deadline - time.monotonic()
        step.reason = _skip_reason(name, gpu, skip, remaining, args.budget)
        if step.reason:
            step.status = "skipped"
            log.line(f"\n=== {name}: skipped: {step.reason}")
        else:
            run_command(step, command, log, min(TIMEOUTS[name], remaining), env, console)
        steps.append(step)
    seconds = time.monotonic() - start
    failed = write_summary(args.out, steps, gpu, seconds, args.budget)
    log.line(f"\ngpu-check summary ({seconds:.0f} s; logs in {args.out})")
    for s in steps:
        log.line(f"  {s.name:<10} {s.describe():<58} {s.seconds:6.1f} s")
    log.line(f"FAILED: {', '.join(failed)}" if failed else "gpu-check: all steps passed or were skipped")
    log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
