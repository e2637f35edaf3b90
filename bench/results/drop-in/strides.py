"""The strides table of bench/results/drop-in/strides.md: nf.masked_conv2d on every backend here against
F.conv2d, output and input gradient, over shape classes and input and weight layouts."""

import itertools, os, sys
os.environ.setdefault("TRITON_INTERPRET", "1"); os.environ.setdefault("NEURONML_FAST_CUDA_EMULATE", "1")
import torch, torch.nn.functional as F
import neuronml_fast as nf
# The grid is the test's (tests/test_drop_in_parity.py), so the table shows exactly what CI checks.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))
from test_drop_in_parity import LAYOUTS, SHAPES, _laid_out  # noqa: E402
backends = [b for b in ("reference", "cpu", "triton", "cuda") if b in nf.backends.available()]
rows = []
for dtype in (torch.float32, torch.float64):
    for (name, (n, c, h, w, o, k)), il, wl in itertools.product(SHAPES.items(), LAYOUTS, LAYOUTS):
        g = torch.Generator().manual_seed(0)
        x = _laid_out(torch.randn(n, c, h, w, dtype=dtype, generator=g), LAYOUTS[il]).requires_grad_()
        wt = _laid_out(torch.randn(o, c, k, k, dtype=dtype, generator=g), LAYOUTS[wl])
        m = torch.ones(o, dtype=dtype)
        ref = F.conv2d(x, wt, padding=k // 2); (rg,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
        cells = []
        for b in backends:
            with nf.use_backend(b):
                out = nf.masked_conv2d(x, wt, m, padding=k // 2)
            (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
            cells.append("=" if (out.stride(), gx.stride()) == (ref.stride(), rg.stride()) else f"{out.stride()} {gx.stride()}")
        rows.append(f"| {str(dtype)[6:]} | {name} | {il} | {wl} | {ref.stride()} | {rg.stride()} | " + " | ".join(cells) + " |")
print("| dtype | shape class | input | weight | torch output strides | torch input-grad strides | " + " | ".join(backends) + " |")
print("|---|---|---|---|---|---|" + "---|" * len(backends))
print("\n".join(rows))
