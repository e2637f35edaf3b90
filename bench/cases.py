"""The one list of benchmark cases, shared by `python -m bench` and `pytest bench/`.

A case builds its inputs on a device and names three things: the eager PyTorch baseline
(`reference`), the neuronml_fast call (`fused`, run under each kernel backend), and how one
iteration runs them (`step`: forward, or forward+backward). The runner adds the torch.compile
baseline and the backends. `flops` and `nbytes` give the case's roofline.
"""

import dataclasses
from typing import Callable

import torch

import neuronml_fast as nf
from neuronml_fast.ops.sensitivity import neuron_sensitivity_reference


@dataclasses.dataclass
class Setup:
    reference: Callable
    fused: Callable
    inputs: list  # input tuples, rotated through so caches do not flatter the kernels
    flops: float
    nbytes: float
    dtype: str = "float32"
    step: Callable = None  # step(fn, inputs) -> Any; default: fn(*inputs)

    def run(self, fn, i):
        inputs = self.inputs[i % len(self.inputs)]
        return self.step(fn, inputs) if self.step else fn(*inputs)


@dataclasses.dataclass
class Case:
    family: str
    name: str
    build: Callable[[torch.device], Setup]
    params: dict
    full_only: bool = False

    @property
    def id(self):
        return f"{self.family}/{self.name}"


def _rotations(nbytes_per_set, device):
    """Enough input copies to stream past the last-level cache (CPU) or L2 (GPU)."""
    budget = (64 << 20) if device.type == "cpu" else (256 << 20)
    return max(1, min(8, budget // max(nbytes_per_set, 1)))


def _sensitivity_case(name, shape, bias=True, full_only=False):
    def build(device):
        numel = torch.Size(shape).numel()
        nbytes = 2 * numel * 4 + (2 * shape[0] * 4 if bias else 0) + shape[0] * 4
        sets = []
        for _ in range(_rotations(nbytes, device)):
            w, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
            b, gb = (torch.randn(shape[0], device=device), torch.randn(shape[0], device=device)) if bias else (None, None)
            sets.append((w, g, b, gb))
        return Setup(neuron_sensitivity_reference, nf.neuron_sensitivity, sets, flops=2 * numel, nbytes=nbytes)

    return Case("neuron_sensitivity", name, build, {"shape": list(shape), "bias": bias}, full_only)


CASES = [
    _sensitivity_case("conv4 64x64x3x3", (64, 64, 3, 3)),
    _sensitivity_case("resnet 512x512x3x3", (512, 512, 3, 3)),
    _sensitivity_case("linear 4096x4096", (4096, 4096), bias=True),
    _sensitivity_case("head 5x1600", (5, 1600)),
    _sensitivity_case("linear 16384x4096", (16384, 4096), full_only=True),
]


def select(patterns=None, full=False):
    """Cases whose id contains any of the patterns (all by default); --full adds the long ones."""
    chosen = [c for c in CASES if full or not c.full_only]
    if patterns:
        chosen = [c for c in chosen if any(p in c.id for p in patterns)]
    return chosen

