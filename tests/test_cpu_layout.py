"""The C++ CPU layout kernel (csrc/cpu/layout.h): a user's NCHW input into the grouped-NHWC storage
the CPU masked convolution computes in, and the autograd wrapper the public function uses."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuronml_fast as nf
from neuronml_fast import _alloc, _extensions
from neuronml_fast.ops.masked import cpu as cpu_masked
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


# ---- output layout: PyTorch's rule for conv2d (the output's memory format follows the input's) ----


def _conv_problem(lead, c_in, c_out, hw, active, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2, c_in, *hw, generator=gen, dtype=dtype)
    w = torch.randn(*lead, c_out, c_in, 3, 3, generator=gen, dtype=dtype) * 0.2
    b = torch.randn(*lead, c_out, generator=gen, dtype=dtype)
    m = torch.rand(*lead, c_out, generator=gen, dtype=dtype) * (torch.rand(*lead, c_out, generator=gen) < active)
    return x, w, b, m


def _layer_step(fn, x, w, b, m, grad):
    x, w, b, m = (t.detach().clone().requires_grad_() for t in (x, w, b, m))
    out = fn(x, w, m, b, 1, 1)
    out.backward(grad)
    return out, (x.grad, w.grad, b.grad, m.grad)


# Channel counts with whole 8-channel blocks (the AVX2 kernels) and without (the portable loops);
# output planes of 8 or more pixels (8 x 8 transposes, a last tile overlapping the one before)
# and of fewer (the portable loops).
@pytest.mark.parametrize("c_in,c_out", [(16, 24), (8, 12), (3, 16)])
@pytest.mark.parametrize("hw", [(5, 7), (2, 3), (4, 4)])
@pytest.mark.parametrize("active", [1.0, 0.4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tasks"])
def test_masked_conv2d_output_layout_follows_the_input(c_in, c_out, hw, active, dtype, layout):
    x, w, b, m = _conv_problem((2,) if layout == "tasks" else (), c_in, c_out, hw, active, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(*x.shape[:-3], c_out, *hw, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with nf.use_backend("cpu"):
        out, grads = _layer_step(nf.masked_conv2d, x, w, b, m, grad)
    want, want_grads = _layer_step(masked_conv2d_reference, x, w, b, m, grad)
    # The bias and mask gradients sum over every output pixel of the batch, in another order than
    # the reference's: float32 rounding grows with that sum's length.
    grad_tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif layout == "contiguous":
        assert out.is_contiguous()
        assert out.view(out.size(0), -1).shape == (out.size(0), out[0].numel())
    else:  # task-batched: the backend's grouped NHWC, the layout its task-batched models run in
        assert cpu_masked.is_grouped_nhwc(out)
    assert grads[0].stride() == x.stride()  # the input gradient in the caller's layout
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, **grad_tol)


def test_masked_conv2d_contiguous_output_at_the_conv4_block_shape():
    x, w, b, m = _conv_problem((), 64, 64, (14, 14), 0.25, torch.float32)
    x = torch.randn(80, 64, 14, 14)  # 80 images
    grad = torch.randn(80, 64, 14, 14)
    with nf.use_backend("cpu"):
        out, grads = _layer_step(nf.masked_conv2d, x, w, b, m, grad)
    want, want_grads = _layer_step(masked_conv2d_reference, *(t.double() for t in (x, w, b, m)), grad.double())
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=1e-4)


def test_a_converted_classic_model_can_flatten_with_view():
    # The classic pattern: conv -> batch norm -> relu -> pool, then x.view(x.size(0), -1).
    class Classic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(16)
            self.head = torch.nn.Linear(16 * 4 * 4, 5)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(self.norm(self.conv(x)).relu(), 2)
            return self.head(x.view(x.size(0), -1))

    torch.manual_seed(0)
    model = Classic()
    x = torch.randn(4, 3, 8, 8)
    want = model(x)
    with nf.use_backend("cpu"):
        nf.nn.convert(model)
        got = model(x)
        got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.conv.weight.grad is not None


@pytest.mark.parametrize("contiguous", [True, False])
def test_masked_conv2d_op_fake_strides_match(contiguous):
    from neuronml_fast.ops import masked

    x, w, b, m = _conv_problem((1,), 16, 16, (5, 6), 0.5, torch.float32)
    if not contiguous:
        x = cpu_masked.to_grouped_nhwc(x, pooled=False)
    args = (x, w, m, b, [1, 1], [1, 1], [1, 1], 1, contiguous, contiguous, True, "cpu")
    torch.library.opcheck(masked.masked_conv2d_op, args)
    out, pre = masked.masked_conv2d_op(*args)
    assert out.is_contiguous() == contiguous and pre.stride() == out.stride()


def test_masked_conv2d_view_under_torch_compile():
    torch._dynamo.reset()
    x, w, b, m = _conv_problem((), 16, 16, (6, 6), 0.5, torch.float32)

    def step(x, w, m, b):
        out = nf.masked_conv2d(x, w, m, b, 1, 1)
        return out.view(out.size(0), -1).square().sum()

    with nf.use_backend("cpu"), torch._inductor.config.patch(fx_graph_cache=False):
        got = torch.compile(step, fullgraph=True)(x, w, m, b)
    torch.testing.assert_close(got, masked_conv2d_reference(x, w, m, b, 1, 1).flatten(1).square().sum())
