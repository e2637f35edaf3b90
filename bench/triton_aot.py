"""`python -m bench.triton_aot`: compile every Triton kernel specialization the launchers produce,
for sm_80 and sm_90, on a machine without a GPU, and fail on what a GPU launch would hit first.

Capture: the real launchers run on small CPU tensors with ``JITFunction.run`` replaced by a
recorder that skips the launch. Triton's own binder (``create_function_from_signature``) and
``JITFunction._pack_args``, bound to the CUDA backend, turn each launch's arguments into the
signature, constexprs, attributes and options a GPU launch would compile; equal ones are merged.

Compile: each specialization is compiled for every architecture (``triton.compile`` with a
``GPUTarget``; ptxas ships with triton) in worker processes, each compile under a wall-clock
bound (the worker's process group is killed past it). Results are cached by (kernel source hash,
specialization, architecture, triton version), so a rerun only compiles what changed.

Fails (exit status 1) on a compile error, a compile over the bound, shared memory over the
per-block limit, a kernel that spills, or a masked-conv GEMM kernel (forward, input or weight
gradient) without a tensor-core instruction, float64 (no Triton fp64 dot) and the exact float32 variants
(``DOT_PRECISION=ieee``, torch's TF32 switch off) excepted. The float32 cases run with TF32 on,
as torch's conv default, plus one conv and one linear case with it off. Reports per specialization: shared memory, registers, spills, tensor-core
instructions (``mma``/``wgmma`` in the PTX) and pointers whose address arithmetic is 32-bit
(``tt.addptr`` with i32 offsets not preceded by a 64-bit one, from the TTIR).

The report (``bench/results/triton-aot.md`` and ``.json``) is deterministic, for committing;
compile times only go to stdout. Needs a process without ``TRITON_INTERPRET``.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "neuronml_fast", "triton_aot")
ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 90: 232448}
# Bump when the analysis of a compiled kernel changes, so cached results are recomputed.
ANALYSIS_VERSION = 2
WORKER_START_SECONDS = 120  # importing torch and triton in a fresh worker, on a loaded machine


# ---- cases: the launcher calls whose specializations are checked ------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: object  # () -> None: calls launchers, whose launches are recorded
    full_only: bool = False


def _torch():
    import torch

    return torch


def _dtype(name):
    return getattr(_torch(), name)


def _fp32_precision(tf32):
    """torch's TF32 switches, for convolutions and matrix products alike, inside the block."""
    from neuronml_fast import _precision

    return _precision.fp32_precision(tf32, tf32)


def _conv(dtype, k=3, *, stride=1, dilation=1, groups=1, bias=True, grad_pre=False, c_in=64, c_out=64, hw=14,
          batch=5, tasks=2, pre=True, input_grad=True, weight_grad=True, tf32=True):
    """Forward and backward of a task-batched masked conv through its Triton launcher."""

    def run():
        with _fp32_precision(tf32):
            launch()

    def launch():
        from neuronml_fast.ops.masked import triton as masked

        torch, dt = _torch(), _dtype(dtype)
        x = torch.randn(tasks, batch, c_in, hw, hw, dtype=dt)
        w = torch.randn(tasks, c_out, c_in // groups, k, k, dtype=dt)
        mask = torch.rand(tasks, c_out, dtype=dt)
        b = torch.randn(tasks, c_out, dtype=dt) if bias else None
        conv = ((stride, stride), ((k // 2) * dilation,) * 2, (dilation, dilation), groups, True)
        out, p = masked.conv2d_forward(x, w, mask, b, *conv)
        masked.conv2d_backward(torch.randn_like(out), torch.randn_like(out) if grad_pre else None, x, w, mask,
                               p if pre else None, *conv, input_grad, weight_grad)

    return run


def _linear(dtype, *, bias=True, grad_pre=False, d_in=64, d_out=32, rows=25, tasks=4, tf32=True):
    def run():
        with _fp32_precision(tf32):
            launch()

    def launch():
        from neuronml_fast.ops.masked import triton as masked

        torch, dt = _torch(), _dtype(dtype)
        x = torch.randn(tasks, rows, d_in, dtype=dt)
        w = torch.randn(tasks, d_out, d_in, dtype=dt)
        mask = torch.rand(tasks, d_out, dtype=dt)
        b = torch.randn(tasks, d_out, dtype=dt) if bias else None
        out, p = masked.linear_forward(x, w, mask, b, True)
        masked.linear_backward(torch.randn_like(out), torch.randn_like(out) if grad_pre else None, x, w, mask, p,
                               True, True, True)

    return run


def _largest_resident(dtype):
    """The largest square layer the resident forward takes: its tile holds accumulation-dtype values
    (float32 for 16-bit inputs)."""
    from neuronml_fast.kernels import plastic as kernels

    return kernels.resident_max_square(8 if dtype == "float64" else 4)


def _plastic(dtype, *, recurrent, n, rule="hebb", modulation=None, clip=None, activation="tanh",
             alpha_scalar=False, state=True, steps=3, batch=4, every=2):
    """Forward and backward of a plastic layer through its Triton launcher (gpu.py's launchers).
    n <= `_largest_resident` takes the resident forward, larger layers the streaming
    one; every layer the one backward kernel and its reduction. ``state=False``: no initial trace,
    y0 or upstream gradient of the trace (the kernels' HAS_* flags off)."""

    def run():
        from neuronml_fast.ops.plastic import Modulator
        from neuronml_fast.ops.plastic import triton as plastic

        torch, dt = _torch(), _dtype(dtype)
        d_in = n if recurrent else n + 8
        x = torch.randn(steps, batch, d_in, dtype=dt)
        weight = torch.randn(n, d_in, dtype=dt)
        alpha = torch.randn((), dtype=dt) if alpha_scalar else torch.randn(n, d_in, dtype=dt)
        eta = torch.tensor(0.1, dtype=dt)
        hebb = torch.randn(batch, n, d_in, dtype=dt) if state else None
        mod = {None: None, "endogenous": None, "scalar": torch.randn(steps, batch, dtype=dt),
               "neuron": torch.randn(steps, batch, n, dtype=dt)}[modulation]
        modulator = None
        if modulation == "endogenous":
            modulator = Modulator(torch.randn(n, dtype=dt), torch.randn((), dtype=dt), torch.randn(n, dtype=dt),
                                  activation == "tanh")
        bias = None if recurrent else torch.randn(n, dtype=dt)
        drive = None if recurrent else torch.randn(steps, batch, n, dtype=dt)
        y0 = torch.randn(batch, n, dtype=dt) if recurrent and state else None
        layer = (clip, recurrent, rule, activation, every)
        out, trace, ckpt, activity, wide = plastic.plastic_forward(x, weight, alpha, eta, hebb, bias, drive, y0, mod,
                                                                   *layer, modulator)
        plastic.plastic_backward(torch.randn_like(out), torch.randn_like(trace) if state else None, x, weight, alpha,
                                 eta, y0, mod, out if wide is None else wide, trace, ckpt, *layer, modulator, activity)

    return run


def _sensitivity(dtype, *, rows, cols, bias=True):
    def run():
        from neuronml_fast.ops.sensitivity import triton as sensitivity

        torch, dt = _torch(), _dtype(dtype)
        w, g = torch.randn(rows, cols, dtype=dt), torch.randn(rows, cols, dtype=dt)
        b = torch.randn(rows, dtype=dt) if bias else None
        sensitivity.neuron_sensitivity(w, g, b, None if b is None else torch.randn_like(b))

    return run


def _batch_norm(dtype, *, rows, channels, u=True):
    """The batch norm's double backward (MAML's second order) through its Triton launcher."""

    def run():
        from neuronml_fast.ops.batch_norm import triton as batch_norm

        torch, dt = _torch(), _dtype(dtype)
        x = torch.randn(rows, channels, dtype=dt)
        mean, invstd = x.mean(0), (x.var(0, unbiased=False) + 1e-5).rsqrt()
        vector = lambda: torch.randn(channels, dtype=dt)  # noqa: E731
        batch_norm.batch_norm_rows_double_backward(torch.randn_like(x) if u else None, vector(), vector(),
                                                   torch.randn_like(x), x, vector(), mean, invstd)

    return run


MASKED_DTYPES = ("float16", "bfloat16", "float32", "float64")
PLASTIC_DTYPES = ("float16", "bfloat16", "float32", "float64")
BATCH_NORM_DTYPES = ("float32", "float64")
SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


def _cases():
    cases = []
    add = lambda id, run, full_only=False: cases.append(Case(id, run, full_only))  # noqa: E731
    for dt in MASKED_DTYPES:
        s = SHORT[dt]
        for k in (1, 3, 5, 7):  # every kernel size in every dtype: compile time grows with the taps
            add(f"conv-{s}-k{k}", _conv(dt, k), full_only=k == 5 and dt != "float16")
        add(f"conv-{s}-k3-stride2", _conv(dt, 3, stride=2), full_only=dt != "float32")
        add(f"conv-{s}-k3-dilation2", _conv(dt, 3, dilation=2), full_only=True)
        add(f"conv-{s}-k3-depthwise", _conv(dt, 3, groups=64), full_only=dt != "float16")
        add(f"conv-{s}-k3-grouped", _conv(dt, 3, groups=4), full_only=True)
        add(f"conv-{s}-k3-rgb-nobias", _conv(dt, 3, c_in=3, bias=False, hw=28), full_only=dt != "float32")
        add(f"conv-{s}-k3-gradpre-nopre", _conv(dt, 3, grad_pre=True, pre=False), full_only=dt != "float16")
        add(f"conv-{s}-k3-weightgrad-only", _conv(dt, 3, input_grad=False), full_only=True)
        add(f"conv-{s}-k3-inputgrad-only", _conv(dt, 3, weight_grad=False), full_only=True)
        # 25 images of 14 x 14: over the pixels one weight-gradient program takes, so the pixels are
        # split and the partial sums added by the split reduction.
        add(f"conv-{s}-k3-split", _conv(dt, 3, batch=25, tasks=1), full_only=dt == "bfloat16")
        add(f"linear-{s}", _linear(dt))
        add(f"linear-{s}-split", _linear(dt, rows=5000, tasks=1), full_only=dt != "float32")
        add(f"linear-{s}-nobias-gradpre", _linear(dt, bias=False, grad_pre=True), full_only=True)
        if dt == "float32":  # the exact float32 GEMMs, torch's TF32 switches off
            add(f"conv-{s}-k3-ieee", _conv(dt, 3, tf32=False))
            add(f"linear-{s}-ieee", _linear(dt, tf32=False))
        add(f"sensitivity-{s}-conv", _sensitivity(dt, rows=64, cols=576))
        add(f"sensitivity-{s}-wide-nobias", _sensitivity(dt, rows=5, cols=4096, bias=False), full_only=dt != "float32")
        add(f"sensitivity-{s}-narrow", _sensitivity(dt, rows=1000, cols=5), full_only=True)
    for dt in PLASTIC_DTYPES:
        s = SHORT[dt]
        for n, size in ((16, "small"), (160, "large")):
            # float64's small layers and 16-bit's variants past hebb, clip, endogenous and linear: --full
            full = (dt == "float64" and size == "small") or dt in ("float16", "bfloat16")
            add(f"rnn-{s}-{size}-hebb", _plastic(dt, recurrent=True, n=n), full_only=full and dt == "float64")
            add(f"rnn-{s}-{size}-oja", _plastic(dt, recurrent=True, n=n, rule="oja"), full_only=full)
            add(f"rnn-{s}-{size}-modulated-neuron", _plastic(dt, recurrent=True, n=n, modulation="neuron"),
                full_only=full)
            add(f"rnn-{s}-{size}-modulated-scalar-alpha-scalar",
                _plastic(dt, recurrent=True, n=n, modulation="scalar", alpha_scalar=True), full_only=full)
            add(f"rnn-{s}-{size}-clip", _plastic(dt, recurrent=True, n=n, clip=0.5), full_only=full and dt == "float64")
            add(f"rnn-{s}-{size}-endogenous", _plastic(dt, recurrent=True, n=n, modulation="endogenous"),
                full_only=full and dt == "float64")
            add(f"rnn-{s}-{size}-endogenous-clip-identity-nostate",
                _plastic(dt, recurrent=True, n=n, modulation="endogenous", clip=0.5, activation="identity",
                         state=False), full_only=True)
            add(f"rnn-{s}-{size}-identity", _plastic(dt, recurrent=True, n=n, activation="identity"),
                full_only=True)
            add(f"linear-plastic-{s}-{size}", _plastic(dt, recurrent=False, n=n), full_only=full and dt == "float64")
            add(f"linear-plastic-{s}-{size}-oja-identity",
                _plastic(dt, recurrent=False, n=n, rule="oja", activation="identity"), full_only=True)
        largest = _largest_resident(dt)
        add(f"rnn-{s}-n{largest}", _plastic(dt, recurrent=True, n=largest))
        add(f"linear-plastic-{s}-n{largest}", _plastic(dt, recurrent=False, n=largest), full_only=True)
    for dt in BATCH_NORM_DTYPES:
        s = SHORT[dt]
        # Conv4's activations in MAML: 5-way 5-shot + 15 queries x 5 x 5 pixels, 4 tasks x 64 channels
        add(f"batch-norm-{s}", _batch_norm(dt, rows=2500, channels=256))
        add(f"batch-norm-{s}-no-u-odd", _batch_norm(dt, rows=37, channels=6, u=False), full_only=dt != "float32")
    return cases


def select(patterns=None, full=False):
    cases = [c for c in _cases() if full or not c.full_only]
    if patterns:
        cases = [c for c in cases if any(p in c.id for p in patterns)]
    return cases


# ---- capture: what a GPU launch of each case would compile --------------------------------------


def _jit_types():
    from triton.runtime.jit import JITFunction

    return JITFunction


def _encode(value):
    """A constexpr value as JSON: triton dtypes by name, everything else as is."""
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"dtype": str(value)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"unsupported constexpr value {value!r}")


def _decode(value):
    import triton.language as tl

    return tl.dtype(value["dtype"]) if isinstance(value, dict) else value


class Recorder:
    """Stands in for JITFunction.run: records a launch's specialization, launches nothing."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", max(ARCHS), 32))
        self._binders = {}
        self.specs = {}  # id -> spec, in first-launch order
        self.launches = []  # (kernel name, grid, spec id) of every launch
        self.kernels = {}  # "module:name" -> JITFunction

    def _binder(self, kernel):
        from triton.runtime.jit import create_function_from_signature

        if kernel not in self._binders:
            self._binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        return self._binders[kernel]

    def record(self, kernel, grid, args, kwargs):
        from triton import knobs

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug  # as JITFunction.run does
        bound, specialization, options = self._binder(kernel)(*args, **kwargs)
        parsed, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, specialization, options)
        names = kernel.arg_names
        name = f"{kernel.fn.__module__}:{kernel.fn.__name__}"
        spec = {
            "kernel": name,
            "dtype": next((t[1:] for t in signature.values() if t.startswith("*")), "-"),  # of the first pointer
            "signature": signature,
            "constexprs": {names[_single(path)]: _encode(v) for path, v in constexprs.items()},
            "attrs": {names[_single(path)]: a for path, a in attrs.items() if a},
            "options": {k: kwargs[k] for k in sorted(kwargs) if k in parsed.__dict__},
        }
        spec_id = _digest(spec)[:12]
        self.specs.setdefault(spec_id, spec)
        self.kernels[name] = kernel
        self.launches.append((kernel.fn.__name__, tuple(grid), spec_id))


def _single(path):
    if len(path) != 1:
        raise NotImplementedError(f"tuple kernel arguments are not captured (path {path})")
    return path[0]


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def intercepted_launches(recorder):
    JITFunction = _jit_types()
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, grid, args, kwargs)

    JITFunction.run = run
    try:
        yield recorder
    finally:
        JITFunction.run = original


def _require_compiled_kernels():
    from neuronml_fast.kernels import masked

    if not isinstance(masked._conv_forward_kernel, _jit_types()):
        raise RuntimeError("the Triton kernels were loaded for the interpreter: run without TRITON_INTERPRET")


def capture(cases):
    """(recorder, {case id: [ids of the specializations it launched]}) for the cases, in order."""
    _require_compiled_kernels()
    recorder = Recorder()
    per_case = {}
    with intercepted_launches(recorder):
        for case in cases:
            first = len(recorder.launches)
            case.run()
            if len(recorder.launches) == first:
                raise RuntimeError(f"case {case.id} launched no kernel")
            per_case[case.id] = sorted({spec_id for _, _, spec_id in recorder.launches[first:]})
    return recorder, per_case


# ---- analysis of a compiled kernel ------------------------------------------------------------

_ARG = re.compile(r"(%[\w.$-]+): !tt\.ptr<")
_ASSIGN = re.compile(r"^\s*(%[\w.$-]+) = ([\w.]+) (.*)$")
_OPERAND = re.compile(r"%[\w.$-]+")
# Ops whose result is a pointer derived from their first operand.
_POINTER_OPS = {"tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans"}


def pointer_offset_widths(ttir):
    """{pointer argument: "i64" or "i32"} from TTIR: "i32" when some address on it is formed with
    a 32-bit offset before any 64-bit one (a wider base keeps the narrow part within one row or
    tile). Pointers carried through loop arguments are not followed."""
    func = next(line for line in ttir.splitlines() if "tt.func public" in line)
    roots = {name: name for name in _ARG.findall(func)}
    widened = {name: False for name in roots}  # value -> a 64-bit offset is already applied
    width = {name: "i64" for name in roots}
    for line in ttir.splitlines():
        m = _ASSIGN.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        operands = _OPERAND.findall(rest.split(" : ")[0])
        if op not in _POINTER_OPS or not operands or operands[0] not in roots:
            continue
        base = operands[0]
        roots[result], widened[result] = roots[base], widened[base]
        if op == "tt.addptr":
            offset_type = rest.split(" : ")[1].split(",")[-1]
            narrow = re.search(r"\bi32\b|xi32>", offset_type) is not None
            if narrow and not widened[base]:
                width[roots[base]] = "i32"
            widened[result] = widened[base] or not narrow
    return {name.lstrip("%"): w for name, w in width.items()}


def tensor_core_instructions(ptx):
    found = []
    if re.search(r"\bwgmma\.mma_async", ptx):
        found.append("wgmma")
    if re.search(r"\bmma\.sync", ptx):
        found.append("mma")
    return found


def ptxas_usage(log):
    """(registers, spill store bytes per thread) from ptxas -v's log."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if not registers or not spills:
        raise RuntimeError(f"no register or spill count in the ptxas log:\n{log}")
    return int(registers.group(1)), int(spills.group(1))


def analyse(compiled, ptxas_log):
    registers, spill_bytes = ptxas_usage(ptxas_log)
    ttir = compiled.asm["ttir"]
    return {
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "registers": registers,
        "spill_bytes": spill_bytes,
        "dots": len(re.findall(r"= tt\.dot ", ttir)),
        "tensor_cores": tensor_core_instructions(compiled.asm["ptx"]),
        "pointer_offsets": pointer_offset_widths(ttir),
    }


# ---- worker: compiles one job at a time, in its own process group -----------------------------


def _load_kernel(name):
    import importlib

    module, attr = name.split(":")
    return getattr(importlib.import_module(module), attr)


def compile_job(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = job["spec"]
    kernel = _load_kernel(spec["kernel"])
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    constexprs = {(index[k],): _decode(v) for k, v in spec["constexprs"].items()}
    attrs = {(index[k],): v for k, v in spec["attrs"].items()}
    src = ASTSource(kernel, spec["signature"], constexprs, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: triton prints ptxas -v's log
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=dict(spec["options"]))
    seconds = time.perf_counter() - start
    return {"ok": True, "seconds": seconds, **analyse(compiled, log.getvalue())}


def worker_main():
    """Reads one JSON job per line from stdin, answers one JSON line per job on the original stdout
    (anything the compiler prints goes to stderr)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _require_compiled_kernels()
    answers.write('{"ready": true}\n')
    answers.flush()
    for line in sys.stdin:
        job = json.loads(line)
        try:
            answer = compile_job(job)
        except Exception as e:  # a compile error is a result to report, not a worker failure
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


class _Worker:
    def __init__(self, env, log):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.triton_aot", "--worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     start_new_session=True)
        self.ready = False
        self.job = None
        self.deadline = time.monotonic() + WORKER_START_SECONDS

    def submit(self, job, timeout):
        self.job, self.deadline = job, time.monotonic() + timeout
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and the ptxas it may be running
        self.proc.wait()


def _worker_env(triton_cache):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = triton_cache  # a scratch folder: results are cached here, not kernels
    env["TRITON_ALWAYS_COMPILE"] = "1"  # compile times are measured, never read from triton's cache
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # registers and spills, as ptxas counts them
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def compile_all(jobs, n_workers, timeout, cache_dir, progress=None):
    """Runs the jobs on n_workers processes; returns one answer per job, in order."""
    answers = [None] * len(jobs)
    pending = list(reversed(jobs))
    os.makedirs(cache_dir, exist_ok=True)
    triton_cache = tempfile.mkdtemp(prefix="triton-", dir=cache_dir)
    env = _worker_env(triton_cache)
    log = open(os.path.join(cache_dir, "workers.log"), "w")
    sel = selectors.DefaultSelector()
    workers = []

    def start():
        w = _Worker(env, log)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        workers.append(w)

    def finish(w, answer):
        answers[w.job["index"]] = answer
        if progress:
            progress(w.job, answer)
        w.job = None

    def replace(w, answer):
        if not w.ready:
            raise RuntimeError(f"a compile worker failed to start ({answer['error']}): see {log.name}")
        if w.job is not None:
            finish(w, answer)
        sel.unregister(w.proc.stdout)
        w.kill()
        workers.remove(w)
        if pending:
            start()

    try:
        for _ in range(min(n_workers, len(jobs))):
            start()
        while pending or any(w.job is not None for w in workers):
            for w in workers:
                if w.ready and w.job is None and pending:
                    w.submit(pending.pop(), timeout)
            waiting = [w for w in workers if w.job is not None or not w.ready]
            for key, _ in sel.select(timeout=max(0.0, min(w.deadline for w in waiting) - time.monotonic())):
                w = key.data
                line = w.proc.stdout.readline()
                if not line:
                    replace(w, {"ok": False, "error": f"worker exited with status {w.proc.wait()}"})
                elif not w.ready:
                    w.ready = True
                else:
                    finish(w, json.loads(line))
            now = time.monotonic()
            for w in [w for w in workers if (w.job is not None or not w.ready) and w.deadline <= now]:
                replace(w, {"ok": False, "error": f"compile exceeded {timeout:g} s" if w.ready else "no answer",
                            "timeout": True})
    finally:
        for w in workers:
            w.kill()
        log.close()
        shutil.rmtree(triton_cache, ignore_errors=True)
    return answers


# ---- the check --------------------------------------------------------------------------------


def _cache_path(cache_dir, job, source_hash, triton_version):
    key = _digest({"spec": job["spec"], "arch": job["arch"], "source": source_hash, "triton": triton_version,
                   "analysis": ANALYSIS_VERSION})
    return os.path.join(cache_dir, "results", key[:2], key + ".json")


def _read_cache(path):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return json.load(f)
    return None


def _write_cache(path, answer):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(answer, f)
    os.replace(tmp, path)


# The masked convolution's GEMM kernels: on the tensor cores and without spills, or the check fails.
GEMM_KERNELS = ("_conv_forward_kernel", "_conv_input_grad_kernel", "_conv_weight_grad_kernel")


def needs_tensor_cores(row):
    """Whether a row is a GEMM variant that must run on the tensor cores: every masked-conv GEMM
    but float64 (Triton has no fp64 dot) and exact float32 (``DOT_PRECISION=ieee``)."""
    if row.get("kernel") not in GEMM_KERNELS:
        return False
    exact_fp32 = row["dtype"] == "fp32" and "DOT_PRECISION=ieee" in row["constexprs"].split()
    return row["dtype"] != "fp64" and not exact_fp32


def failures_of(row):
    """Why a compiled specialization fails the check (empty when it passes)."""
    if not row["ok"]:
        return [row["error"]]
    failures = []
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        failures.append(f"shared memory {row['shared']} B over the sm_{row['arch']} per-block limit "
                        f"{SHARED_LIMIT[row['arch']]} B")
    if needs_tensor_cores(row) and not row["tensor_cores"]:
        failures.append("a GEMM without tensor-core instructions (no mma/wgmma in the PTX)")
    if row.get("spill_bytes"):
        kind = "a GEMM" if row.get("kernel") in GEMM_KERNELS else "a kernel"
        failures.append(f"{kind} that spills {row['spill_bytes']} B per thread")
    return failures


def short_constexprs(spec):
    """NAME=value for the kernel's constexpr parameters and int arguments specialized to 1;
    flags set to True by name, flags set to False left out."""
    parts = []
    for name, value in spec["constexprs"].items():
        if value is True:
            parts.append(name)
        elif value is False or value is None:
            continue
        elif isinstance(value, dict):
            parts.append(f"{name}={value['dtype']}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def build_rows(recorder, jobs, answers):
    rows = []
    for job, answer in zip(jobs, answers):
        spec = recorder.specs[job["spec_id"]]
        row = {"kernel": spec["kernel"].split(":")[1], "dtype": spec["dtype"],
               "constexprs": short_constexprs(spec), "spec": job["spec_id"], "arch": job["arch"],
               "cases": job["cases"], **{k: v for k, v in answer.items() if k not in ("seconds", "cached")}}
        row["failures"] = failures_of(row)
        row["seconds"] = answer.get("seconds")
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["constexprs"], r["spec"], r["arch"]))
    return rows


def _narrow(row):
    return sorted(p for p, w in row.get("pointer_offsets", {}).items() if w == "i32")


def _summary(rows):
    ok = [r for r in rows if r["ok"]]
    return {
        "specializations": len({r["spec"] for r in rows}),
        "compiles": len(rows),
        "failures": sum(1 for r in rows if r["failures"]),
        "with_spills": sum(1 for r in ok if r["spill_bytes"]),
        "max_shared": {f"sm_{a}": max((r["shared"] for r in ok if r["arch"] == a), default=0) for a in ARCHS},
        "dot_kernels_without_tensor_cores": sum(
            1 for r in ok if r["dots"] and not r["tensor_cores"] and (needs_tensor_cores(r) or r["dtype"] in
                                                                       ("fp16", "bf16"))),
    }


def _report_json(rows, archs, triton_version):
    keep = ("kernel", "dtype", "constexprs", "spec", "arch", "cases", "ok", "error", "shared", "num_warps",
            "num_stages", "registers", "spill_bytes", "dots", "tensor_cores", "failures")
    return {
        "triton": triton_version,
        "archs": [f"sm_{a}" for a in archs],
        "shared_limit": {f"sm_{a}": SHARED_LIMIT[a] for a in archs},
        "summary": _summary(rows),
        "results": [{**{k: r[k] for k in keep if k in r}, "pointers_32bit": _narrow(r)} for r in rows],
    }


def _cell(row, key):
    if not row["ok"]:
        return "-"
    value = row[key]
    if key == "tensor_cores":
        return ",".join(value) or ("no" if row["dots"] else "-")
    return str(value)


def _table(rows, with_seconds=False):
    head = ["kernel", "dtype", "constexprs", "spec", "arch", "warps", "shared B", "regs", "spill B", "tensor cores",
            "32-bit pointers", "status"]
    if with_seconds:
        head.append("compile s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kernel"], r["dtype"], r["constexprs"], r["spec"], f"sm_{r['arch']}", _cell(r, "num_warps"),
                 _cell(r, "shared"), _cell(r, "registers"), _cell(r, "spill_bytes"), _cell(r, "tensor_cores"),
                 " ".join(_narrow(r)) or "-", "; ".join(f.splitlines()[0] for f in r["failures"]) or "ok"]
        if with_seconds:
            cells.append("-" if r["seconds"] is None else f"{r['seconds']:.1f}")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _report_md(report, rows):
    s = report["summary"]
    return "\n".join([
        "# Triton AOT check",
        "",
        "Every specialization the Triton launchers produce for the cases of `bench/triton_aot.py`, compiled for "
        f"{', '.join(report['archs'])} with triton {report['triton']} (`python -m bench.triton_aot`). "
        "A row fails on a compile error, a compile over the time bound, shared memory over the per-block limit "
        f"({', '.join(f'{a}: {v} B' for a, v in report['shared_limit'].items())}), a spill, or a masked-conv GEMM "
        "without a tensor-core instruction (float64 and the exact float32 variants, `DOT_PRECISION=ieee`, excepted).",
        "",
        f"- specializations: {s['specializations']}, compiles: {s['compiles']}, failures: {s['failures']}",
        f"- compiles with spills: {s['with_spills']}",
        f"- largest shared memory: {', '.join(f'{a}: {v} B' for a, v in s['max_shared'].items())}",
        f"- kernels with dots but no tensor-core instructions (fp16/bf16, and the fp32 GEMMs on TF32): "
        f"{s['dot_kernels_without_tensor_cores']}",
        "",
        "tensor cores: `mma`/`wgmma` in the PTX (`no`: the kernel has dots without them, `-`: no dots). "
        "32-bit pointers: arguments addressed with an i32 offset before any 64-bit one (TTIR `tt.addptr`). "
        "spill B: bytes of spill stores per thread (ptxas). spec: the specialization's id "
        "(signature, constexprs, divisibility, options).",
        "",
        _table(rows),
        "",
    ])


def write_report(rows, report_dir, archs):
    import triton

    report = _report_json(rows, archs, triton.__version__)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "triton-aot.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(report_dir, "triton-aot.md"), "w") as f:
        f.write(_report_md(report, rows))
    return report


def run_check(cases, archs=ARCHS, jobs=2, timeout=120.0, cache_dir=DEFAULT_CACHE, use_cache=True, only=None,
              log=print):
    """Captures, compiles (or reads from the cache) and returns the report rows."""
    import triton

    recorder, per_case = capture(cases)
    cases_of = {}
    for case_id, ids in per_case.items():
        for spec_id in ids:
            cases_of.setdefault(spec_id, []).append(case_id)
    spec_ids = [i for i in recorder.specs if not only or any(o in recorder.specs[i]["kernel"] for o in only)]
    all_jobs = [{"spec_id": i, "spec": recorder.specs[i], "arch": a, "cases": cases_of.get(i, [])}
                for i in spec_ids for a in archs]
    source = {name: k.cache_key for name, k in recorder.kernels.items()}
    answers, todo = [None] * len(all_jobs), []
    for n, job in enumerate(all_jobs):
        job["cache"] = _cache_path(cache_dir, job, source[job["spec"]["kernel"]], triton.__version__)
        cached = _read_cache(job["cache"]) if use_cache else None
        if cached is not None:
            answers[n] = {**cached, "cached": True}
        else:
            todo.append(dict(job, index=len(todo)))
    log(f"{len(spec_ids)} specializations x {len(archs)} archs = {len(all_jobs)} compiles; "
        f"{len(all_jobs) - len(todo)} cached, {len(todo)} to compile on {jobs} workers (bound {timeout:g} s)")
    started = time.monotonic()

    def progress(job, answer):
        status = f"{answer['seconds']:.1f} s" if answer["ok"] else answer["error"].splitlines()[0]
        log(f"  [{time.monotonic() - started:6.1f} s] {job['spec']['kernel'].split(':')[1]} "
            f"sm_{job['arch']} {job['spec_id']}: {status}")

    fresh = compile_all(todo, jobs, timeout, cache_dir, progress) if todo else []
    by_index = iter(fresh)
    for n in range(len(all_jobs)):
        if answers[n] is None:
            answers[n] = next(by_index)
            if answers[n]["ok"]:
                _write_cache(all_jobs[n]["cache"], answers[n])
    return build_rows(recorder, all_jobs, answers)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.triton_aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="all cases (default: the short list for CI)")
    p.add_argument("--cases", nargs="*", help="only cases whose id contains one of these strings")
    p.add_argument("--only", nargs="*", help="only kernels whose name contains one of these strings")
    p.add_argument("--arch", nargs="*", type=int, default=list(ARCHS), choices=ARCHS)
    p.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="wall-clock bound per compile, s (default 120)")
    p.add_argument("--report-dir", default=RESULTS, help="where triton-aot.md/.json go (default bench/results)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"result cache (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="compile everything, ignore cached results")
    p.add_argument("--list", action="store_true", help="print the captured specializations as JSON and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _list(cases):
    recorder, per_case = capture(cases)
    print(json.dumps({"specs": recorder.specs, "cases": per_case, "launches": recorder.launches}, sort_keys=True))
    return 0


def main(argv=None):
    args = parse(argv)
    if args.worker:
        worker_main()
        return 0
    cases = select(args.cases, args.full)
    if not cases:
        print("no case matches --cases", file=sys.stderr)
        return 2
    if args.list:
        return _list(cases)
    started = time.monotonic()
    rows = run_check(cases, sorted(set(args.arch)), args.jobs, args.timeout, args.cache_dir, not args.no_cache,
                     args.only)
    report = write_report(rows, args.report_dir, sorted(set(args.arch)))
    print(_table(rows, with_seconds=True))
    s = report["summary"]
    compiled = [r["seconds"] for r in rows if r["ok"] and r["seconds"] is not None]
    print(f"\n{s['specializations']} specializations, {s['compiles']} compiles, {s['failures']} failures, "
          f"{s['with_spills']} with spills; slowest compile {max(compiled, default=0):.1f} s; "
          f"wall {time.monotonic() - started:.0f} s; report in {args.report_dir}")
    for r in rows:
        for failure in r["failures"]:
            print(f"FAIL {r['kernel']} {r['dtype']} sm_{r['arch']} {r['spec']} ({r['constexprs']}): {failure}",
                  file=sys.stderr)
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ.pop("TRITON_INTERPRET")  # must happen before triton is imported
    sys.exit(main())
