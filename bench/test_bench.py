"""pytest-benchmark over the same cases as `python -m bench`: pytest bench/ --benchmark-only."""

import pytest
import torch

from bench.cases import select
from bench.runner import build_variants

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = ("eager", "compile", "torch.func", "cpu", "triton", "cuda")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", select(), ids=lambda c: c.id)
def test_case(benchmark, case, variant):
    _, variants = build_variants(case, DEVICE, with_compile=variant == "compile")
    if variant not in variants:
        pytest.skip(f"{variant} cannot run on {DEVICE} here")
    fn = variants[variant]
    fn(0)  # compile / warm up outside the measurement
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = case.id
    benchmark(lambda: (fn(0), sync()))
