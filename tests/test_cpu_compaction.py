"""The C++ CPU backend's compaction plan and weight-row gather/scatter (csrc/cpu/masked.h)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronml_fast import _extensions
from neuronml_fast.ops.masked import cpu as cpu_masked

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
    comp = cpu_masked.compaction(mask, skip_zero, may_gather=allow)
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
        if weight.dim() != 3:
            continue  # a conv weight gradient is expanded in C++ (expand_weight_grad, tested with the conv)
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
        ext.scatter_rows_out(torch.randn(1, 1, 4), slot, torch.empty(1, 3, 4))
    with pytest.raises(RuntimeError, match="expected rows \\[T, C, R\\] and compact"):
        ext.scatter_rows_out(torch.randn(1, 2, 5), slot, torch.empty(1, 3, 4))
    with pytest.raises(RuntimeError, match="rows \\(out\\): expected a contiguous"):
        ext.scatter_rows_out(torch.randn(1, 2, 4), slot, torch.empty(1, 4, 3).transpose(1, 2))


def _expand(compact, slot):
    """compact [T, N, S, J] -> full [T, N, S, C] by the slots, zeros for pruned channels (torch ops)."""
    if compact.shape[3] == 0:  # every channel pruned
        return compact.new_zeros(*compact.shape[:3], slot.shape[1])
    gathered = compact.gather(3, slot.clamp(min=0)[:, None, None, :].expand(*compact.shape[:3], -1))
    return torch.where(slot[:, None, None, :] >= 0, gathered, 0)


# The epilogue and prologue the CPU masked conv uses: float32 with C % 8 == 0 takes the 8-channel
# permute blocks, the rest the per-channel loops. Compacted tasks (some incomplete: their padding
# slots must stay zero) and uncompacted ones with pruned channels (allow=False). Full tensors
# channels last, or channels first (contiguous NCHW outputs: 8 x 8 transposes from 8 pixels on,
# bands ending in a tile that overlaps the one before).
@settings(max_examples=80, deadline=None)
@given(tasks=st.integers(1, 3), n=st.integers(1, 3), blocks=st.integers(1, 5), extra=st.sampled_from([0, 0, 3]),
       s=st.sampled_from([1, 3, 4, 8, 13, 16, 21, 300]), zeros=st.floats(0, 1), allow=st.booleans(),
       with_bias=st.booleans(), with_grad_pre=st.booleans(), with_pre=st.booleans(), channels_first=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_epilogue_and_prologue_match_torch_ops(tasks, n, blocks, extra, s, zeros, allow, with_bias, with_grad_pre,
                                              with_pre, channels_first, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    c = 8 * blocks + extra
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    mask = rand(tasks, c)
    mask[torch.rand(tasks, c, generator=gen) < zeros] = 0
    comp = cpu_masked.compaction(mask, True, may_gather=allow)
    slot = comp.slot
    y, bias = rand(tasks, n, s, comp.width), rand(tasks, c) if with_bias else None

    def full(fill):  # a [tasks, n, s, c] view in the layout under test
        if channels_first:
            return fill((tasks, n, c, s)).transpose(2, 3)
        return fill((tasks, n, s, c))

    nan = lambda: full(lambda shape: torch.full(shape, float("nan"), dtype=dtype))  # noqa: E731
    out, pre = nan(), nan()
    ext.masked_forward_epilogue_out(y, slot, mask, bias, out, pre)
    want_pre = _expand(y, slot) + (0 if bias is None else torch.where(slot >= 0, bias, 0)[:, None, None, :])
    assert torch.equal(pre, want_pre)
    assert torch.equal(out, want_pre * mask[:, None, None, :])

    grad_out, grad_pre = full(lambda shape: rand(*shape)), full(lambda shape: rand(*shape)) if with_grad_pre else None
    gy = torch.zeros(tasks, n, s, comp.width, dtype=dtype)  # the contract: pre-zeroed
    grad_bias, grad_mask = torch.full((tasks, c), float("nan"), dtype=dtype), torch.full((tasks, c), float("nan"), dtype=dtype)
    ext.masked_backward_prologue_out(grad_out, grad_pre, pre if with_pre else None, slot, mask, gy, grad_bias, grad_mask)
    v = grad_out * mask[:, None, None, :] + (0 if grad_pre is None else grad_pre)
    kept = slot >= 0
    want_gy = torch.zeros_like(gy)
    for t in range(tasks):
        want_gy[t, :, :, slot[t][kept[t]]] = v[t][:, :, kept[t]]
    tol = dict(atol=1e-5, rtol=1e-5)  # go * m + gp may be one fused multiply-add
    torch.testing.assert_close(gy, want_gy, **tol)
    for t in range(tasks):  # slots that hold no channel stay exactly zero
        unused = torch.ones(comp.width, dtype=torch.bool)
        unused[slot[t][kept[t]]] = False
        assert torch.equal(gy[t][..., unused], torch.zeros_like(gy[t][..., unused]))
    torch.testing.assert_close(grad_bias, torch.where(kept, v.sum((1, 2)), 0), **tol)
    want_mask = torch.where(kept, (grad_out * pre).sum((1, 2)), 0) if with_pre else torch.zeros_like(grad_mask)
    torch.testing.assert_close(grad_mask, want_mask, **tol)


# The C++ conv launchers' weight compaction and its inverse for the weight gradient: the same rows
# as the Python helpers, for contiguous and channels-last weights, every element written.
@settings(max_examples=30, deadline=None)
@given(tasks=st.integers(1, 3), channels=st.integers(1, 9), c_in=st.integers(1, 5), k=st.integers(1, 3),
       zeros=st.floats(0, 0.9), channels_last=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_conv_weight_compaction_and_expansion(tasks, channels, c_in, k, zeros, channels_last, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.randn(tasks, channels, generator=gen, dtype=dtype)
    mask[torch.rand(tasks, channels, generator=gen) < zeros] = 0
    comp = cpu_masked.compaction(mask, True, True)
    if not comp.compacted:
        return
    weight = torch.randn(tasks, channels, c_in, k, k, generator=gen, dtype=dtype)
    if channels_last:
        weight = cpu_masked.channels_last_weight(weight)
    compact = ext.compact_weight_rows(weight, comp.slot, comp.width)
    assert torch.equal(compact, cpu_masked._compact_rows(weight, comp))
    grad = cpu_masked.channels_last_weight(torch.randn(tasks, comp.width, c_in, k, k, generator=gen, dtype=dtype))
    full = ext.expand_weight_grad(grad, comp.slot, True)  # NaN-poisoned first
    assert full.permute(0, 1, 3, 4, 2).is_contiguous()  # channels-last weight strides
    want = torch.zeros(weight.shape, dtype=dtype)
    for t in range(tasks):
        for c in range(channels):
            if comp.slot[t, c] >= 0:
                want[t, c] = grad[t, comp.slot[t, c]]
    assert torch.equal(full, want)


def test_conv_launcher_bad_arguments():
    x, w = torch.randn(1, 2, 16, 5, 5), torch.randn(1, 8, 16, 3, 3)
    def forward(m, b=None, w=w):
        return ext.masked_conv2d_forward(x, w, m, b, [1, 1], [1, 1], [1, 1], 1, skip_zero=True, contiguous=False,
                                         poison=False)

    with pytest.raises(RuntimeError, match="mask: expected shape \\[1, 8\\], got \\[8\\]"):
        forward(torch.ones(8))
    with pytest.raises(RuntimeError, match="bias: expected shape \\[1, 8\\], got \\[8\\]"):
        forward(torch.ones(1, 8), torch.ones(8))
    with pytest.raises(RuntimeError, match="weight: expected dtype Float, got Double"):
        forward(torch.ones(1, 8), w=w.double())
    with pytest.raises(RuntimeError, match="expected input \\[T, N, C_in, H, W\\] and weight"):
        forward(torch.ones(1, 8), w=w[0])
    slot = torch.tensor([[0, -1, 1]])
    with pytest.raises(RuntimeError, match="slot: entries must lie in \\[-1, 1\\)"):
        ext.compact_weight_rows(torch.randn(1, 3, 2, 3, 3), slot, 1)
    with pytest.raises(RuntimeError, match="grad: expected a \\[T, width, C_in, kH, kW\\] tensor with channels-last"):
        ext.expand_weight_grad(torch.randn(1, 2, 2, 3, 3), slot, False)


def test_conv_backward_launcher_bad_arguments():
    x, w, m = torch.randn(1, 2, 16, 5, 5), torch.randn(1, 8, 16, 3, 3), torch.ones(1, 8)

    def backward(grad_out, mask=m, pre=None, w=w):
        return ext.masked_conv2d_backward(grad_out, None, x, w, mask, pre, [1, 1], [1, 1], [1, 1], 1, True, True,
                                          True, False, False)

    go = torch.randn(1, 2, 8, 5, 5)
    assert [g.shape for g in backward(go)] == [x.shape, w.shape, (1, 8), (1, 8)]
    expected = "grad_out: expected the output's shape \\[1, 2, 8, 5, 5\\], got \\[1, 2, 9, 5, 5\\]"
    with pytest.raises(RuntimeError, match=expected):
        backward(torch.randn(1, 2, 9, 5, 5))
    with pytest.raises(RuntimeError, match="grad_out: expected dtype Float, got Double"):
        backward(go.double())
    with pytest.raises(RuntimeError, match="mask: expected shape \\[1, 8\\], got \\[1, 9\\]"):
        backward(go, mask=torch.ones(1, 9))
    with pytest.raises(RuntimeError, match="pre: expected shape"):
        backward(go, pre=torch.randn(1, 2, 8, 5, 4))
    with pytest.raises(RuntimeError, match="weight: expected dtype Float, got Double"):
        backward(go, w=w.double())
