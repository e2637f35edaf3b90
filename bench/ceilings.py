"""The machine's ceilings (copy and read bandwidth, matmul FLOP/s) and each case's roofline fraction.

A case's roofline time is max(flops / matmul rate, bytes / best of copy and read bandwidth); its
achieved fraction is roofline time / measured time. Two things make that fraction exceed 1 when
the ceilings are measured once for the whole run, so each case measures its own:

* drift: on a shared machine the attainable rate changes by several times within minutes, so
  the ceiling probes of a case are timed in the same interleaved rounds as its variants and see
  the same load;
* caches: a case whose working set fits in L2/L3 streams faster than DRAM, so the bandwidth
  probe copies a buffer of the case's working set, not a DRAM-sized one.

* shapes: a library kernel can beat one square matmul at a shape it favours, so the matmul
  ceiling is the best of a large square matmul and the case's own GEMM shapes (`Setup.gemm_shapes`:
  the convolutions as im2col GEMMs, the linear layers' GEMMs), all at the case's thread count;
* call overhead: a probe of a small, cache-resident working set spends most of a call outside
  the copy, so the read probe re-reads the working set many times in one call (a stride-0 view),
  and the bandwidth ceiling is that of the cache level the working set lives in.

A case can then pass its ceilings only where the ceilings are wrong: such a row is reported at 100 %,
flagged and listed as a defect of its ceiling (`report.ceiling_defects`), never as a number above
100 %.
"""

import dataclasses

import torch

from .timing import interleaved

PROBE_PREFIX = "ceiling:"
MIN_PROBE_BYTES = 64 << 10
MAX_PROBE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}  # well past the last-level cache / L2
# Bytes one read probe call streams at least: a cache-resident working set is re-read until then.
MIN_READ_BYTES_PER_CALL = 4 << 20
MAX_GEMM_PROBES = 3  # of a case's own GEMM shapes, the largest
METHOD = ("per case: copy/read of the case's working set (re-read in cache when it fits) and the best of a "
          "large matmul and the case's own GEMM shapes, at its thread count, interleaved with its variants; "
          "a fraction above 1 is a ceiling defect, reported as 1 and flagged")


@dataclasses.dataclass
class Ceilings:
    device: str
    copy_gbps: float  # bytes read + written per second / 1e9, by dst.copy_(src)
    read_gbps: float  # bytes read per second / 1e9, by src.sum()
    matmul_tflops: dict  # dtype name -> TFLOP/s
    probe_bytes: int = 0  # bytes the bandwidth probes touched (the working set they stand for)

    def roofline_s(self, flops, nbytes, dtype="float32"):
        rate = self.matmul_tflops.get(dtype) or self.matmul_tflops["float32"]
        bandwidth = max(self.copy_gbps, self.read_gbps) * 1e9
        return max(flops / (rate * 1e12) if flops else 0.0, nbytes / bandwidth if nbytes else 0.0)


def roofline_fraction(roofline_s, measured_s):
    """(fraction reported, raw fraction when it was above 1 else None); the reported one is <= 1."""
    if not roofline_s or not measured_s:
        return float("nan"), None
    raw = roofline_s / measured_s
    return (1.0, raw) if raw > 1.0 else (raw, None)


def _matmul_size(device, quick):
    return 8192 if device.type == "cuda" else (1024 if quick else 2048)


def _probe_elements(device, working_set_bytes):
    """float32 elements of each of the probe's two buffers: together they span the working set."""
    limit = MAX_PROBE_BYTES.get(device.type, MAX_PROBE_BYTES["cpu"])
    total = min(max(int(working_set_bytes), MIN_PROBE_BYTES), limit)
    return max(1, total // 8)


def _gemm_probe_shapes(n, gemm_shapes):
    """The square n x n x n matmul and up to MAX_GEMM_PROBES of the case's (M, K, N) shapes, largest
    first, without repeats."""
    own = sorted({tuple(int(d) for d in shape) for shape in gemm_shapes if min(shape) > 0},
                 key=lambda s: -s[0] * s[1] * s[2])[:MAX_GEMM_PROBES]
    return [(n, n, n)] + [s for s in own if s != (n, n, n)]


def probes(device, working_set_bytes, dtype="float32", quick=True, gemm_shapes=()):
    """{name: fn(i)} ceiling probes to time beside a case's variants, and a function that turns
    their timings into `Ceilings`. ``gemm_shapes``: the case's own (M, K, N) GEMMs."""
    device = torch.device(device)
    n_copy = _probe_elements(device, working_set_bytes)
    src = torch.empty(n_copy, device=device).normal_()
    dst = torch.empty_like(src)
    # A stride-0 view: one call re-reads the same (cache-resident) buffer `reps` times.
    reps = max(1, MIN_READ_BYTES_PER_CALL // (4 * n_copy))
    reread = src.expand(reps, n_copy)
    torch_dtype = getattr(torch, dtype)
    fns = {PROBE_PREFIX + "copy": lambda i: dst.copy_(src), PROBE_PREFIX + "read": lambda i: reread.sum()}
    gemms = {}
    for m, k, n in _gemm_probe_shapes(_matmul_size(device, quick), gemm_shapes):
        a = torch.randn(m, k, device=device, dtype=torch_dtype)
        b = torch.randn(k, n, device=device, dtype=torch_dtype)
        name = f"{PROBE_PREFIX}matmul {m}x{k}x{n}"
        gemms[name] = 2 * m * k * n
        fns[name] = lambda i, a=a, b=b: torch.mm(a, b)

    def ceilings(timings):
        return Ceilings(
            str(device),
            copy_gbps=2 * n_copy * 4 / timings[PROBE_PREFIX + "copy"].median_s / 1e9,
            read_gbps=reps * n_copy * 4 / timings[PROBE_PREFIX + "read"].median_s / 1e9,
            matmul_tflops={dtype: max(flops / timings[name].median_s for name, flops in gemms.items()) / 1e12},
            probe_bytes=2 * n_copy * 4,
        )

    return fns, ceilings


def measure(device, quick=True):
    """Whole-machine ceilings (DRAM-sized copy, every matmul dtype) for the report's header."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    working_set = (2 << 30) if gpu else (128 << 20)  # 1 GiB per buffer on GPU, 64 MiB on CPU
    dtypes = ["float32", "bfloat16"] if gpu else ["float32"]
    result = None
    for dtype in dtypes:
        fns, to_ceilings = probes(device, working_set, dtype, quick)
        ceilings = to_ceilings(interleaved(fns, device, rounds=5))
        if result is None:
            result = ceilings
        else:
            result.matmul_tflops.update(ceilings.matmul_tflops)
    return result
