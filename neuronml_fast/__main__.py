"""`python -m neuronml_fast`: what this machine has, and which backend runs which op.

`python -m neuronml_fast check [--backend B] [--device D] [--dtype T] [--quick]` runs every
usable backend against the float64 reference (`neuronml_fast.selfcheck`) and exits non-zero on
any mismatch or error.
"""

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

import torch

import neuronml_fast as nf
from neuronml_fast import _extensions, backends

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _version_line(command, last=False):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    if not lines:
        return None
    return (lines[-1] if last else lines[0]).strip()


def _triton_version():
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        import triton
    except Exception as exc:  # a broken triton install is worth reporting, not crashing on
        return f"import failed: {exc}"
    return triton.__version__


def _build_line():
    try:
        from neuronml_fast._build_info import BUILD
    except ImportError:
        return "unknown (no build record: not installed through setup.py)"
    if BUILD["torch"] is None:
        return "no torch (pure-Python install)"
    march = ("portable baseline, AVX2/FMA chosen at run time" if BUILD["march"] == "baseline"
             else f"-march={BUILD['march']}")
    line = f"torch {BUILD['torch']} (CUDA {BUILD['torch_cuda'] or 'none'}), {march}"
    if BUILD["cuda_archs"]:
        line += f", GPU archs {BUILD['cuda_archs']}"
    if BUILD["torch"] != torch.__version__:
        line += f"  <- NOT this torch ({torch.__version__}): rebuild with pip install --no-build-isolation ."
    return line


def environment():
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None)
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "neuronml_fast": nf.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU-only build)",
        "extensions built with": _build_line(),
        "triton": _triton_version(),
        "nvcc": (_version_line([nvcc, "--version"], last=True) if nvcc and os.path.exists(nvcc) else None) or "not found",
        "C++ compiler": (_version_line([cxx, "--version"]) if cxx else None) or "not found",
        "CPU": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "GPU": ", ".join(devices) or "none visible",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "requested backend": _requested_backend_line(),
    }


def _requested_backend_line():
    problem = backends.environment_problem()
    if problem:
        return f"{backends.get_backend()!r}  <- NOT a backend, every op raises this error: {problem}"
    return backends.get_backend()


def report():
    lines = ["neuronml_fast environment", ""]
    env = environment()
    width = max(map(len, env))
    lines += [f"  {key:<{width}}  {value}" for key, value in env.items()]
    lines += ["", "backends"]
    for name, st in backends.status().items():
        detail = f"  ({st.detail})" if st.detail else ""
        lines.append(f"  {name:<10} {st.state}{detail}")
    gpu = torch.cuda.is_available()
    lines += ["", "which backend 'auto' runs (op, device: dtype backend; '*' marks the documented reference fallback)"]
    plan = backends.plan(assume_device=True)
    for op in backends.ops():
        for device in backends.AUTO_ORDER:
            cells = []
            for dtype, short in _DTYPE_NAMES.items():
                chosen = plan[(op, device, dtype)]
                cells.append(f"{short} {chosen}{'*' if chosen == 'reference' else ''}")
            note = "  (no device here: plan for a GPU machine)" if device == "cuda" and not gpu else ""
            lines.append(f"  {op:<22} {device:<5} " + ", ".join(cells) + note)
    lines += ["", "auto's order on CUDA tensors and why (override: neuronml_fast.set_backend or NEURONML_FAST_BACKEND)"]
    lines += [f"  {line}" for line in _gpu_order_notes()]
    lines += ["", "inside the cpu backend", *[f"  {line}" for line in _cpu_kernel_notes()]]
    return "\n".join(lines)


def _gpu_order_notes():
    """Per op and dtype: the GPU backends auto tries on CUDA tensors, in order, and the reason."""
    lines = []
    for op, entry in backends.ops().items():
        for dtype, short in _DTYPE_NAMES.items():
            order, reason = backends.gpu_order(entry.family, dtype)
            lines.append(f"{op:<22} {short:<4} {' > '.join(order + ('reference',))}: {reason}")
    return lines


def _cpu_kernel_notes():
    """Which dense kernels the C++ CPU backend uses around its fused loops."""
    cpu = _extensions.load("_C_cpu")
    if cpu is None:
        return ["(not built)"]
    own = ("the faster of the own AVX2 kernels and oneDNN" if cpu.conv_grad_available()
           else "oneDNN (AVX2/FMA kernels not in use here)")
    policy = cpu.conv_policy()
    rule = {"auto": "measured per case (shape, active count, dtype, threads, parameters) at its first use",
            "own": "forced to the own kernels where they apply",
            "onednn": "forced to oneDNN (grouped or per task, measured)"}.get(policy, f"forced to {policy}")
    avx2 = cpu.vector_isa() == "avx2"  # chosen at run time; the same choice decides the vector paths below
    loops = "8 channels per AVX2 permute for float32 with C % 8 == 0, else per channel" if avx2 else "per channel"
    isa = (f"vector kernels: {cpu.vector_isa()} (chosen at run time; NEURONML_FAST_CPU_ISA=baseline forces the "
           "portable loops)" + ("; the whole extension was compiled for this machine (-march)" if cpu.compiled_with_avx
                                else ""))
    return [isa,
            f"masked conv dense kernels: NEURONML_FAST_CPU_CONV={policy}: {rule}",
            "masked_conv2d forward: oneDNN (NHWC) on the active neurons, task-batched as one grouped call or one "
            "call per task",
            f"masked_conv2d input and weight gradients: {own} for float32 with C_in % 16 == 0 and groups == 1, "
            "else oneDNN (grouped or per task)",
            "masked_linear: ATen bmm on the active neurons",
            f"masked layers' fused epilogue (bias, mask, scatter) and prologue (gather, bias/mask gradients): {loops}",
            "a caller's NCHW conv input: copied into grouped NHWC by "
            + ("8 x 8 AVX2 register transposes (float32)" if avx2 else "scalar loops"),
            "large CPU outputs: the package's buffer pool (neuronml_fast.cpu.pool_stats)"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "check":
        from neuronml_fast import selfcheck

        return selfcheck.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m neuronml_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("report", "check"), default="report",
                        help="report (default): the environment and backend table; check: the self-check")
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
