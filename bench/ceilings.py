"""The machine's ceilings, measured once per run: copy bandwidth and matmul FLOP/s.

A case's roofline time is max(flops / matmul rate, bytes / best of copy and read bandwidth); its achieved
fraction is roofline time / measured time.
"""

import dataclasses

import torch

from .timing import interleaved


@dataclasses.dataclass
class Ceilings:
    device: str
    copy_gbps: float  # bytes read + written per second / 1e9, by dst.copy_(src)
    read_gbps: float  # bytes read per second / 1e9, by src.sum()
    matmul_tflops: dict  # dtype name -> TFLOP/s

    def roofline_s(self, flops, nbytes, dtype="float32"):
        rate = self.matmul_tflops.get(dtype) or self.matmul_tflops["float32"]
        bandwidth = max(self.copy_gbps, self.read_gbps) * 1e9
        return max(flops / (rate * 1e12) if flops else 0.0, nbytes / bandwidth if nbytes else 0.0)


def measure(device, quick=True):
    device = torch.device(device)
    gpu = device.type == "cuda"
    n_copy = (1 << 28 if gpu else 1 << 24)  # elements of float32: 1 GiB on GPU, 64 MiB on CPU
    src = torch.empty(n_copy, device=device).normal_()
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda i: dst.copy_(src), "read": lambda i: src.sum()}, device, rounds=5)
    copy_gbps = 2 * src.numel() * 4 / t["copy"].median_s / 1e9
    read_gbps = src.numel() * 4 / t["read"].median_s / 1e9
    del src, dst

    tflops = {}
    dtypes = [torch.float32, torch.bfloat16] if gpu else [torch.float32]
    n = 8192 if gpu else (1024 if quick else 2048)
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = interleaved({"mm": lambda i: torch.mm(a, b)}, device, rounds=5)["mm"]
        tflops[str(dtype).replace("torch.", "")] = 2 * n**3 / t.median_s / 1e12
    return Ceilings(str(device), copy_gbps, read_gbps, tflops)
