"""Training memory of the plastic layers: the bytes autograd keeps for the backward pass.

Counted exactly with saved-tensor hooks (neuronml_fast._memory.saved_bytes: what a training step
holds between forward and backward), for eager PyTorch (one trace per step) and for the fused op
(O(B * N^2)).
"""

import torch

import neuronml_fast as nf
from neuronml_fast._memory import saved_bytes
from neuronml_fast.ops.plastic import plastic_rnn_reference


def plastic_memory(device, batch=4, n=256, steps=(100, 1000)):
    rows = []
    for T in steps:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(T, batch, n, generator=gen) * 0.1).to(device)
        w = (torch.randn(n, n, generator=gen) * 0.01).to(device).requires_grad_()
        a = (torch.randn(n, n, generator=gen) * 0.01).to(device).requires_grad_()
        eta = torch.tensor(0.01, device=device, requires_grad=True)
        eager = saved_bytes(plastic_rnn_reference, x, w, a, eta)
        fused = saved_bytes(nf.plastic_rnn, x, w, a, eta)
        rows.append({"batch": batch, "n": n, "steps": T, "eager_mb": eager / 2**20, "fused_mb": fused / 2**20})
    return rows


def table(rows):
    lines = ["| plastic_rnn training memory | eager MB | fused MB | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| B={r['batch']} N={r['n']} T={r['steps']} | {r['eager_mb']:.1f} | {r['fused_mb']:.1f} "
                     f"| {r['eager_mb'] / r['fused_mb']:.0f}x |")
    return "\n".join(lines)
