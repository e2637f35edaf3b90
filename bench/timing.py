"""How we time: warm-up, calibrated inner loops, interleaved rounds, medians with spread.

Variants of one case are timed round-robin (A B C, B C A, ...) so that drift of the machine
(turbo, a neighbour's load) hits all of them alike; a ratio of medians is then a fair ratio.
On a GPU each sample is bracketed by CUDA events after a synchronize; on the CPU by
perf_counter. Where a case asks for it, inputs rotate over several copies so that caches do
not flatter memory-bound kernels.
"""

import dataclasses
import statistics
import time

import torch


@dataclasses.dataclass
class Timing:
    median_s: float
    q1_s: float
    q3_s: float
    samples: int
    inner: int

    @property
    def spread(self):
        """Interquartile range relative to the median."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s else 0.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn, inner):
        _sync(self.device)
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(inner):
                fn(i)
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3 / inner
        t0 = time.perf_counter()
        for i in range(inner):
            fn(i)
        return (time.perf_counter() - t0) / inner


def _calibrate(clock, fn, target_s):
    """Inner iterations so that one sample lasts about target_s."""
    inner = 1
    while True:
        elapsed = clock(fn, inner) * inner
        if elapsed >= target_s or inner >= 1 << 16:
            return inner
        inner = min(inner * max(2, int(target_s / max(elapsed, 1e-7))), 1 << 16)


def interleaved(variants, device, *, rounds=7, warmup_s=0.1, sample_s=None):
    """Time each ``variants[name](i)`` (i = iteration index, for input rotation).

    Returns {name: Timing}. ``rounds`` samples per variant, taken round-robin.
    """
    device = torch.device(device)
    clock = _Clock(device)
    sample_s = sample_s if sample_s is not None else (0.005 if device.type == "cuda" else 0.03)
    inner = {}
    for name, fn in variants.items():
        deadline = time.perf_counter() + warmup_s
        fn(0)  # first call: compilation, autotuning, allocator growth
        while time.perf_counter() < deadline:
            clock(fn, 1)
        inner[name] = _calibrate(clock, fn, sample_s)
    samples = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(clock(variants[name], inner[name]))
    result = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = Timing(statistics.median(values), q[0], q[2], len(values), inner[name])
    return result
