"""The C++ CPU backend's compaction plan and weight-row gather/scatter (csrc/cpu/masked.h)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronml_fast import _extensions
from neuronml_fast.cpu import masked as cpu_masked

ext = _extensions.cpu()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ CPU extension not built")


def _plan_oracle(mask, skip_zero, allow):
    """The plan in torch ops: (slot, width, compacted, complete)."""
    T, C = mask.shape
    keep = mask != 0 if skip_zero else torch.ones_like(mask, dtype=torch.bool)
    counts = keep.sum(1)
    if allow and T and C and bool((counts < C).any()):
        width = int(counts.max())
        return torch.where(keep, keep.cumsum(1) - 1, -1), width, True, bool((counts == width).all())
    identity = torch.arange(C).expand(T, C)
    return torch.where(keep, identity, -1), C, False, bool(keep.all())


@settings(max_examples=60, deadline=None)
@given(tasks=st.integers(0, 4), channels=st.integers(0, 9), zeros=st.floats(0, 1), skip_zero=st.booleans(),
       allow=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_plan_gather_and_scatter_match_torch_ops(tasks, channels, zeros, skip_zero, allow, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.randn(tasks, channels, generator=gen, dtype=dtype)
    mask[torch.rand(tasks, channels, generator=gen) < zeros] = 0
    comp = cpu_masked.compaction(mask, skip_zero, allow)
    slot, width, compacted, complete = _plan_oracle(mask, skip_zero, allow)
    assert torch.equal(comp.slot, slot)
    assert (comp.width, comp.compacted, comp.complete) == (width, compacted, complete)
    if not compacted:
        return
    # Strided (copied to rows), channels-last conv weights (kept in their layout), linear weights.
    for weight in (torch.randn(tasks, channels, 3, 2, 4, generator=gen, dtype=dtype).to(
                       memory_format=torch.channels_last_3d),
                   torch.randn(tasks, channels, 5, 2, 2, generator=gen, dtype=dtype)
                   .permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),
                   torch.randn(tasks, channels, 7, generator=gen, dtype=dtype)):
        compact = cpu_masked._compact_rows(weight, comp)
        assert compact.shape == (tasks, width, *weight.shape[2:])
        want = torch.zeros_like(compact)
        for t in range(tasks):
            for c in range(channels):
                if slot[t, c] >= 0:
                    want[t, slot[t, c]] = weight[t, c]
        assert torch.equal(compact, want)
        full = cpu_masked._expand_rows(compact, comp, weight.shape)
        keep = (slot >= 0).view(tasks, channels, *([1] * (weight.dim() - 2)))
        assert torch.equal(full, torch.where(keep, weight, 0))


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="mask: expected \\[T, C\\]"):
        ext.masked_compaction(torch.ones(3), True, True)
    with pytest.raises(RuntimeError, match="mask: expected dtype float32 or float64"):
        ext.masked_compaction(torch.ones(2, 3, dtype=torch.int64), True, True)
    slot = torch.tensor([[0, -1, 1]])
    with pytest.raises(RuntimeError, match="slot: entries must lie in \\[-1, 1\\)"):
        ext.gather_rows_out(torch.randn(1, 3, 4), slot, torch.empty(1, 1, 4))
    with pytest.raises(RuntimeError, match="expected rows \\[T, C, R\\] and compact"):
        ext.gather_rows_out(torch.randn(1, 3, 4), slot, torch.empty(1, 2, 5))
    with pytest.raises(RuntimeError, match="rows \\(out\\): expected a contiguous"):
        ext.scatter_rows_out(torch.randn(1, 2, 4), slot, torch.empty(1, 4, 3).transpose(1, 2))
