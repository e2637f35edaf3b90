"""Turns a case into timed variants: eager, torch.compile of eager, and each kernel backend."""

import dataclasses

import torch

import neuronml_fast as nf

from . import ceilings as ceilings_mod
from .timing import interleaved

KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def kernel_backends(device):
    """Backends to time on this device. The Triton interpreter is for testing, never timed."""
    device = torch.device(device)
    usable = [b for b in KERNEL_BACKENDS if device.type in nf.backends.status(b).devices]
    return [b for b in usable if not (b == "triton" and device.type == "cpu")]


def _on_backend(setup, backend):
    def run(i):
        with nf.use_backend(backend):
            return setup.run(setup.fused, i)

    return run


def build_variants(case, device, with_compile=True):
    """(setup, {variant name: fn(i)}) for one case on one device."""
    setup = case.build(torch.device(device))
    variants = {"eager": lambda i: setup.run(setup.reference, i)}
    if with_compile and case.compile_baseline:
        compiled = torch.compile(setup.reference)
        variants["compile"] = lambda i: setup.run(compiled, i)
    for name, fn in setup.extras.items():
        variants[name] = lambda i, fn=fn: setup.run(fn, i)
    for backend in kernel_backends(device):
        variants[backend] = _on_backend(setup, backend)
    return setup, variants


@dataclasses.dataclass
class Row:
    case: str
    family: str
    params: dict
    variant: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    speedup_vs_eager: float
    speedup_vs_compile: float
    roofline_fraction: float  # <= 1; extra["roofline_above_ceiling"] holds the raw value when it was above
    extra: dict = dataclasses.field(default_factory=dict)


def do_bench_ms(fn):
    """Median of ``triton.testing.do_bench`` (CUDA only): a second, independent GPU timer.

    It flushes L2 between calls and times with CUDA events; our interleaved timer rotates inputs
    instead. Both are reported so a disagreement shows. Inputs still rotate through ``fn(i)``.
    """
    from triton.testing import do_bench

    counter = iter(range(1 << 30))
    return do_bench(lambda: fn(next(counter)), return_mode="median")


def run_case(case, device, rounds=7, with_compile=True, quick=True):
    """Rows of one case; its ceilings are probed in the same interleaved rounds as its variants."""
    setup, variants = build_variants(case, device, with_compile)
    probes, to_ceilings = ceilings_mod.probes(device, setup.working_set, setup.dtype, quick, setup.gemm_shapes)
    timings = interleaved({**variants, **probes}, device, rounds=rounds)
    ceilings = to_ceilings({name: timings.pop(name) for name in probes})
    cross_check = {}
    if torch.device(device).type == "cuda" and "cuda" in nf.backends.status("triton").devices:
        cross_check = {name: do_bench_ms(fn) for name, fn in variants.items()}
    roofline = ceilings.roofline_s(setup.flops, setup.nbytes, setup.dtype)
    ceiling = {"copy_gbps": ceilings.copy_gbps, "read_gbps": ceilings.read_gbps,
               "matmul_tflops": ceilings.matmul_tflops[setup.dtype], "probe_bytes": ceilings.probe_bytes}
    eager, compiled = timings["eager"].median_s, timings.get("compile")
    rows = []
    for name, t in timings.items():
        fraction, above = ceilings_mod.roofline_fraction(roofline, t.median_s)
        extra = {"ceiling": ceiling}
        if above is not None:
            extra["roofline_above_ceiling"] = above
        if name in cross_check:
            extra["do_bench_ms"] = cross_check[name]
        rows.append(Row(
            case=case.id, family=case.family, params=case.params, variant=name,
            median_ms=t.median_s * 1e3, q1_ms=t.q1_s * 1e3, q3_ms=t.q3_s * 1e3,
            speedup_vs_eager=eager / t.median_s,
            speedup_vs_compile=(compiled.median_s / t.median_s) if compiled else float("nan"),
            roofline_fraction=fraction, extra=extra,
        ))
    return rows
