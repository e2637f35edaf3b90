"""The C++ CPU layout kernel (csrc/cpu/layout.h): a user's NCHW input into the grouped-NHWC storage
the CPU masked convolution computes in, and the autograd wrapper the public function uses."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuronml_fast as nf
from neuronml_fast import _alloc, _extensions
from neuronml_fast.cpu import masked as cpu_masked
from neuronml_fast.ops.masked import masked_conv2d_reference

ext = _extensions.cpu()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ CPU extension not built")


# Channels around multiples of 8 (the register blocks) and pixel counts below, at and between
# multiples of 8 (the last block overlaps the one before).
@settings(max_examples=60, deadline=None)
@given(tasks=st.integers(1, 3), n=st.integers(0, 3), c=st.integers(1, 20), h=st.integers(1, 6), w=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_to_grouped_nhwc_matches_permute(tasks, n, c, h, w, dtype, seed):
    x = torch.randn(tasks, n, c, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    with _alloc.poisoned():
        out = _alloc.empty((n, h, w, tasks, c), dtype=dtype, device="cpu")
    ext.to_grouped_nhwc_out(x, out)
    assert torch.equal(out, x.permute(1, 3, 4, 0, 2))


def test_to_grouped_nhwc_conv4_block_shape():
    x = torch.randn(1, 80, 64, 14, 14)
    out = torch.full((80, 14, 14, 1, 64), float("nan"))
    ext.to_grouped_nhwc_out(x, out)
    assert torch.equal(out, x.permute(1, 3, 4, 0, 2))


def test_grouped_copy_is_differentiable_and_gives_a_contiguous_gradient():
    # The public function copies an NCHW input through the kernel; the gradient must reach the
    # caller's tensor (the kernel itself is not differentiable) in its own layout.
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0.5], dtype=torch.float64)
    with nf.use_backend("cpu"):
        grouped = cpu_masked.to_grouped_nhwc(x.unsqueeze(0))
        assert cpu_masked.is_grouped_nhwc(grouped) and grouped.requires_grad
        torch.autograd.gradcheck(lambda t: cpu_masked.to_grouped_nhwc(t.unsqueeze(0)) * 2, (x,))
        gx, = torch.autograd.grad(nf.masked_conv2d(x, w, mask, None, 1, 1).sum(), x)
    want, = torch.autograd.grad(masked_conv2d_reference(x, w, mask, None, 1, 1).sum(), x)
    assert gx.is_contiguous()
    torch.testing.assert_close(gx, want)


def test_to_grouped_nhwc_bad_arguments():
    x = torch.randn(1, 2, 8, 3, 3)
    with pytest.raises(RuntimeError, match="input: expected a contiguous \\[T, N, C, H, W\\]"):
        ext.to_grouped_nhwc_out(x.transpose(3, 4), torch.empty(2, 3, 3, 1, 8))
    with pytest.raises(RuntimeError, match="input: expected a contiguous \\[T, N, C, H, W\\]"):
        ext.to_grouped_nhwc_out(torch.randn(2, 8, 3, 3), torch.empty(2, 3, 3, 1, 8))
    with pytest.raises(RuntimeError, match="out: expected a contiguous \\[N, H, W, T, C\\] = \\[2, 3, 3, 1, 8\\]"):
        ext.to_grouped_nhwc_out(x, torch.empty(2, 3, 3, 8))
    with pytest.raises(RuntimeError, match="out: expected a CPU Float tensor, got Double"):
        ext.to_grouped_nhwc_out(x, torch.empty(2, 3, 3, 1, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input: expected dtype float32 or float64"):
        ext.to_grouped_nhwc_out(x.half(), torch.empty(2, 3, 3, 1, 8))
