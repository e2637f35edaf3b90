"""Run by tests/test_cpu_portable.py under qemu-x86_64 with a chosen CPU model: the installed CPU
extension must pick the vector path that CPU has and match the reference.

NumPy is kept out of the process: its wheels carry an ISA baseline of their own that moves with
each release (qemu's older CPU models cannot run some of them), and this check is about our
extension's dispatch, not NumPy's. torch runs without it."""

import sys
import time
import warnings

sys.modules["numpy"] = None  # `import numpy` raises ImportError; torch then runs without NumPy
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
t0 = time.time()
import torch  # noqa: E402
import neuronml_fast as nf  # noqa: E402
from neuronml_fast import _extensions
from neuronml_fast.ops.masked import masked_conv2d_reference
cpu = _extensions.cpu()
print("vector_isa:", cpu.vector_isa(), "compiled_with_avx:", cpu.compiled_with_avx, "import s:", round(time.time() - t0, 1))
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 9, 9, generator=g)
w = torch.randn(16, 16, 3, 3, generator=g) * 0.1
m = torch.tensor([1.0, 0.0] * 8)
b = torch.randn(16, generator=g)
x.requires_grad_(); w.requires_grad_()
with nf.use_backend("cpu"):
    out = nf.masked_conv2d(x, w, m, b, padding=1)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
ref = masked_conv2d_reference(x, w, m, b, padding=(1, 1))
rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
err = max((out - ref).abs().max().item(), (gx - rx).abs().max().item(), (gw - rw).abs().max().item())
print("masked_conv2d cpu backend vs reference, max abs err:", err, "contiguous:", out.is_contiguous())
assert err < 1e-3

from neuronml_fast.ops.plastic import plastic_rnn_reference
xs, wr, ar = torch.randn(6, 3, 13, generator=g), torch.randn(13, 13, generator=g) * 0.3, torch.randn(13, 13, generator=g) * 0.3
wr.requires_grad_(); ar.requires_grad_()
with nf.use_backend("cpu"):
    y, h = nf.plastic_rnn(xs, wr, ar, 0.2)
    gw, ga = torch.autograd.grad(y.square().sum() + h.sum(), (wr, ar))
ry, rh = plastic_rnn_reference(xs, wr, ar, 0.2)
rgw, rga = torch.autograd.grad(ry.square().sum() + rh.sum(), (wr, ar))
err = max((a - b).abs().max().item() for a, b in ((y, ry), (h, rh), (gw, rgw), (ga, rga)))
print("plastic_rnn cpu backend vs reference, max abs err:", err)
assert err < 1e-3
assert "numpy" not in sys.modules or sys.modules["numpy"] is None, "numpy was imported"
print("total s:", round(time.time() - t0, 1))
