"""Turns a case into timed variants: eager, torch.compile of eager, and each kernel backend."""

import dataclasses

import torch

import neuronml_fast as nf

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
    roofline_fraction: float
    extra: dict = dataclasses.field(default_factory=dict)


def do_bench_ms(fn):
    """Median of ``triton.testing.do_bench`` (CUDA only): a second, independent GPU timer.

    It flushes L2 between calls and times with CUDA events; our interleaved timer rotates inputs
    instead. Both are reported so a disagreement shows. Inputs still rotate through ``fn(i)``.
    """
    from triton.testing import do_bench

    counter = iter(range(1 << 30))
    return do_bench(lambda: fn(next(counter)), return_mode="median")


def run_case(case, device, ceilings, rounds=7, with_compile=True):
    setup, variants = build_variants(case, device, with_compile)
    timings = interleaved(variants, device, rounds=rounds)
    cross_check = {}
    if torch.device(device).type == "cuda" and "cuda" in nf.backends.status("triton").devices:
        cross_check = {name: do_bench_ms(fn) for name, fn in variants.items()}
    roofline = ceilings.roofline_s(setup.flops, setup.nbytes, setup.dtype)
    eager, compiled = timings["eager"].median_s, timings.get("compile")
    rows = []
    for name, t in timings.items():
        rows.append(Row(
            case=case.id, family=case.family, params=case.params, variant=name,
            median_ms=t.median_s * 1e3, q1_ms=t.q1_s * 1e3, q3_ms=t.q3_s * 1e3,
            speedup_vs_eager=eager / t.median_s,
            speedup_vs_compile=(compiled.median_s / t.median_s) if compiled else float("nan"),
            roofline_fraction=roofline / t.median_s if roofline else float("nan"),
            extra={"do_bench_ms": cross_check[name]} if name in cross_check else {},
        ))
    return rows
