"""The C++ CPU weight- and input-gradient kernels (csrc/cpu/conv_grad.cpp) the masked conv uses for
float32 inputs with a multiple of 16 input channels: against oneDNN and the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuronml_fast as nf
import neuronml_fast.cpu  # noqa: F401  (nf.cpu: the conv policy)
from neuronml_fast import _alloc, _extensions
from neuronml_fast.ops.masked import masked_conv2d_reference

ext = _extensions.load("_C_cpu")
pytestmark = pytest.mark.skipif(ext is None or not ext.conv_grad_available(),
                                reason="C++ CPU extension without the AVX2/FMA convolution-gradient kernels")


@pytest.fixture
def own_policy():
    """The masked conv's dense core forced to these kernels (else measured: tests/test_conv_choice.py)."""
    nf.cpu.set_conv_policy("own")
    yield
    nf.cpu.set_conv_policy(None)


def _oracle(gy, x, tasks, kernel, stride, padding, dilation):
    """oneDNN's grouped weight gradient in float64, as [T, A, kH, kW, C]."""
    n, h_out, w_out, ta = gy.shape
    _, h, w, tc = x.shape
    a, c = ta // tasks, tc // tasks
    weight = torch.zeros(ta, c, *kernel, dtype=torch.float64)
    grad = torch.ops.aten.convolution_backward(
        gy.double().permute(0, 3, 1, 2), x.double().permute(0, 3, 1, 2), weight, None, stride, padding, dilation,
        False, [0, 0], tasks, [False, True, False])[1]
    return grad.view(tasks, a, c, *kernel).permute(0, 1, 3, 4, 2)


# Random task-batched convolutions: tasks, images, C_in (multiple of 16), active channels, input
# size, kernel, stride, padding, dilation.
CONV_CASES = dict(
    tasks=st.integers(1, 3), n=st.integers(1, 4), c=st.sampled_from([16, 32, 48]), a=st.integers(0, 14),
    h=st.integers(1, 9), w=st.integers(1, 9), k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), seed=st.integers(0, 2**16))


def _output_hw(h, w, k, stride, padding, dilation):
    """(H_out, W_out), or None where the dilated kernel does not fit."""
    hw = [(size + 2 * p - d * (kk - 1) - 1) // s + 1
          for size, kk, s, p, d in zip((h, w), k, stride, padding, dilation)]
    return tuple(hw) if min(hw) >= 1 else None


@settings(max_examples=25, deadline=None)
@given(**CONV_CASES)
def test_kernel_matches_onednn(tasks, n, c, a, h, w, k, stride, padding, dilation, seed):
    out_hw = _output_hw(h, w, k, stride, padding, dilation)
    if out_hw is None or a == 0:  # oneDNN rejects an empty weight
        return
    h_out, w_out = out_hw
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, tasks * c, generator=gen)
    gy = torch.randn(n, h_out, w_out, tasks * a, generator=gen)
    with _alloc.poisoned():
        out = _alloc.empty((tasks, a, *k, c), dtype=torch.float32, device="cpu")
    ext.conv2d_weight_grad_out(gy, x, out, list(stride), list(padding), list(dilation))
    want = _oracle(gy, x, tasks, k, list(stride), list(padding), list(dilation))
    torch.testing.assert_close(out.double(), want, atol=1e-4 * (1 + want.abs().max().item()), rtol=1e-4)


def _input_oracle(gy, weight, tasks, input_hw, stride, padding, dilation):
    """oneDNN's grouped input gradient in float64, as [N, H, W, T*C] (weight: [T, A, kH, kW, C])."""
    t, a, kh, kw, c = weight.shape
    if a == 0:  # no active channel: nothing reaches the input (oneDNN rejects an empty weight)
        return torch.zeros(gy.shape[0], *input_hw, t * c, dtype=torch.float64)
    w = weight.double().reshape(t * a, kh, kw, c).permute(0, 3, 1, 2)
    x = torch.zeros(gy.shape[0], t * c, *input_hw, dtype=torch.float64)
    grad = torch.ops.aten.convolution_backward(
        gy.double().permute(0, 3, 1, 2), x, w, None, stride, padding, dilation, False, [0, 0], tasks,
        [True, False, False])[0]
    return grad.permute(0, 2, 3, 1)


def _input_grad(gy, weight, tasks, n, c, h, w, stride, padding, dilation, channels_first):
    """The kernel's input gradient, NaN-poisoned first, as [N, H, W, T*C]; channels_first writes the
    [T, N, C, H, W] layout (a user's NCHW input) instead of grouped NHWC."""
    shape = (tasks, n, c, h, w) if channels_first else (n, h, w, tasks * c)
    with _alloc.poisoned():  # every element must be written, input positions no tap reaches included
        out = _alloc.empty(shape, dtype=torch.float32, device="cpu")
    ext.conv2d_input_grad_out(gy, weight, out, list(stride), list(padding), list(dilation))
    return out.permute(1, 3, 4, 0, 2).reshape(n, h, w, tasks * c) if channels_first else out


# Widths up to 19: the channels-first store transposes blocks of 8 positions (narrower rows, whole
# blocks, and a last block overlapping the one before).
@settings(max_examples=40, deadline=None)
@given(channels_first=st.booleans(), **{**CONV_CASES, "w": st.integers(1, 19)})
def test_input_grad_kernel_matches_onednn(channels_first, tasks, n, c, a, h, w, k, stride, padding, dilation, seed):
    out_hw = _output_hw(h, w, k, stride, padding, dilation)
    if out_hw is None:
        return
    h_out, w_out = out_hw
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(tasks, a, *k, c, generator=gen)
    gy = torch.randn(n, h_out, w_out, tasks * a, generator=gen)
    out = _input_grad(gy, weight, tasks, n, c, h, w, stride, padding, dilation, channels_first)
    want = _input_oracle(gy, weight, tasks, (h, w), list(stride), list(padding), list(dilation))
    torch.testing.assert_close(out.double(), want, atol=1e-4 * (1 + want.abs().max().item()), rtol=1e-4)


# Unit column stride takes the all-taps register tiles (5 columns, the last tile overlapping the
# one before): widths below, at and between multiples of the tile, any row stride, padding wider
# than the kernel reach, dilation.
@settings(max_examples=40, deadline=None)
@given(channels_first=st.booleans(), **{**CONV_CASES, "w": st.integers(1, 23),
                                        "stride": st.tuples(st.integers(1, 3), st.just(1)),
                                        "padding": st.tuples(st.integers(0, 3), st.integers(0, 3))})
def test_input_grad_unit_column_stride_matches_onednn(channels_first, tasks, n, c, a, h, w, k, stride, padding,
                                                      dilation, seed):
    test_input_grad_kernel_matches_onednn.hypothesis.inner_test(
        channels_first, tasks, n, c, a, h, w, k, stride, padding, dilation, seed)


@pytest.mark.parametrize("channels_first", [False, True])
def test_input_grad_conv4_block_shape_matches_onednn(channels_first):
    gen = torch.Generator().manual_seed(0)
    weight, gy = torch.randn(1, 16, 3, 3, 64, generator=gen) * 0.05, torch.randn(80, 14, 14, 16, generator=gen)
    out = _input_grad(gy, weight, 1, 80, 64, 14, 14, [1, 1], [1, 1], [1, 1], channels_first)
    torch.testing.assert_close(out.double(), _input_oracle(gy, weight, 1, (14, 14), [1, 1], [1, 1], [1, 1]),
                               atol=1e-4, rtol=1e-4)


def test_conv4_block_shape_matches_onednn():
    gen = torch.Generator().manual_seed(0)
    x, gy = torch.randn(80, 14, 14, 64, generator=gen), torch.randn(80, 14, 14, 16, generator=gen)
    out = torch.empty(1, 16, 3, 3, 64)
    ext.conv2d_weight_grad_out(gy, x, out, [1, 1], [1, 1], [1, 1])
    want = _oracle(gy, x, 1, (3, 3), [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("tasks", [None, 3])
def test_masked_conv2d_float32_uses_them_and_matches_the_reference(tasks, own_policy):
    assert ext.masked_conv2d_own_grads_available(torch.float32, 16, 1)
    assert not ext.masked_conv2d_own_grads_available(torch.float64, 16, 1)
    assert not ext.masked_conv2d_own_grads_available(torch.float32, 12, 1)
    assert not ext.masked_conv2d_own_grads_available(torch.float32, 16, 2)
    gen = torch.Generator().manual_seed(1)
    t = () if tasks is None else (tasks,)
    x = torch.randn(*t, 4, 16, 9, 9, generator=gen)
    w = torch.randn(*t, 10, 16, 3, 3, generator=gen) * 0.1
    b = torch.randn(*t, 10, generator=gen)
    m = (torch.rand(*t, 10, generator=gen) > 0.4).float()
    leaves = [v.clone().requires_grad_() for v in (x, w, b, m)]
    with nf.use_backend("cpu"), _alloc.poisoned():
        out = nf.masked_conv2d(*leaves, stride=2, padding=1)
        got = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [v.double().requires_grad_() for v in (x, w, b, m)]
    ref = masked_conv2d_reference(*ref_leaves, stride=2, padding=1)
    want = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, atol=1e-3, rtol=1e-4)
    # The input gradient comes back in the caller's (contiguous) layout: autograd adds it into
    # x.grad without a transposing pass.
    assert got[0].is_contiguous(), got[0].stride()


def test_masked_conv2d_float32_gradients_are_these_kernels_bit_for_bit(own_policy):
    # With every neuron active the compact output gradient is grad_out itself, so the layer's
    # input and weight gradients must be exactly what the kernels give. At this shape oneDNN
    # rounds differently, so the check tells the two paths apart.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(8, 16, 3, 3, generator=gen) * 0.1).requires_grad_()
    g = torch.randn(3, 8, 7, 7, generator=gen)
    with nf.use_backend("cpu"):
        out = nf.masked_conv2d(x, w, torch.ones(8), torch.zeros(8), padding=1)
        got = torch.autograd.grad(out, (x, w), g)
    gy = g.permute(0, 2, 3, 1).contiguous()
    gw = torch.empty(1, 8, 3, 3, 16)
    ext.conv2d_weight_grad_out(gy, x.detach().permute(0, 2, 3, 1).contiguous(), gw, [1, 1], [1, 1], [1, 1])
    gx = torch.empty(3, 7, 7, 16)
    ext.conv2d_input_grad_out(gy, w.detach().permute(0, 2, 3, 1).contiguous().unsqueeze(0), gx, [1, 1], [1, 1],
                              [1, 1])
    kernels = (gx.permute(0, 3, 1, 2), gw[0].permute(0, 3, 1, 2))
    onednn = torch.ops.aten.convolution_backward(g.contiguous(memory_format=torch.channels_last), x.detach(),
                                                 w.detach().contiguous(memory_format=torch.channels_last), None,
                                                 [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])[:2]
    if all(torch.equal(a, b) for a, b in zip(onednn, kernels)):
        pytest.skip("oneDNN agrees with the kernels bit for bit here: the two paths look alike")
    for name, have, want in zip(("input", "weight"), got, kernels):
        assert torch.equal(have, want), f"the {name} gradient is not the AVX2 kernels' own"


def test_masked_conv2d_input_grad_follows_the_input_layout():
    # The input gradient as the op returns it (autograd.grad: before autograd's own layout fix-up
    # for .grad): contiguous for an NCHW input, so x.grad accumulates without a transposing pass;
    # channels-last for a channels-last input (e.g. the previous masked conv's output), the layout
    # the kernels compute in.
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 16, 7, 6, generator=gen), torch.randn(8, 16, 3, 3, generator=gen)
    m = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1])
    ref_x = x.double().requires_grad_()
    ref = masked_conv2d_reference(ref_x, w.double(), m.double(), padding=1)
    (want,) = torch.autograd.grad(ref, ref_x, torch.ones_like(ref))
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.clone(memory_format=layout).requires_grad_()
        with nf.use_backend("cpu"):
            out = nf.masked_conv2d(xl, w, m, padding=1)
            (got,) = torch.autograd.grad(out, xl, torch.ones_like(out))
        assert got.is_contiguous(memory_format=layout), (layout, got.stride())
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_bad_arguments():
    x, gy = torch.randn(2, 5, 5, 16), torch.randn(2, 5, 5, 4)
    out = torch.empty(1, 4, 3, 3, 16)
    with pytest.raises(RuntimeError, match="float32"):
        ext.conv2d_weight_grad_out(gy.double(), x, out, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="divisible by 16"):
        ext.conv2d_weight_grad_out(gy, torch.randn(2, 5, 5, 8), torch.empty(1, 4, 3, 3, 8), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="grad_out"):
        ext.conv2d_weight_grad_out(torch.randn(2, 4, 5, 4), x, out, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.conv2d_weight_grad_out(gy, torch.randn(2, 5, 16, 5).transpose(2, 3), out, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="stride"):
        ext.conv2d_weight_grad_out(gy, x, out, [0, 1], [1, 1], [1, 1])


def test_input_grad_bad_arguments():
    gy, weight, out = torch.randn(2, 5, 5, 4), torch.randn(1, 4, 3, 3, 16), torch.empty(2, 5, 5, 16)
    with pytest.raises(RuntimeError, match="weight: expected a float32"):
        ext.conv2d_input_grad_out(gy, weight.double(), out, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="divisible by 16"):
        ext.conv2d_input_grad_out(gy, torch.randn(1, 4, 3, 3, 8), torch.empty(2, 5, 5, 8), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="grad_out: expected"):
        ext.conv2d_input_grad_out(torch.randn(2, 4, 5, 4), weight, out, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="grad_input: expected 32 channels"):
        ext.conv2d_input_grad_out(gy, torch.randn(2, 2, 3, 3, 16), out, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="grad_input \\(out\\): expected a contiguous"):
        ext.conv2d_input_grad_out(gy, weight, torch.empty(2, 16, 5, 5).permute(0, 2, 3, 1), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="stride"):
        ext.conv2d_input_grad_out(gy, weight, out, [1, 1], [-1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="expected 1 tasks, got 2"):
        ext.conv2d_input_grad_out(gy, weight, torch.empty(2, 2, 16, 5, 5), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"expected \[N, H, W, T\*C_in\] or \[T, N, C_in, H, W\]"):
        ext.conv2d_input_grad_out(gy, weight, torch.empty(2, 5, 80), [1, 1], [1, 1], [1, 1])


@pytest.mark.parametrize("channels_first", [False, True])
def test_input_grad_shared_weight_matches_per_task_copies(channels_first):
    # MAML's inner step runs every task with the same meta-weights: an expanded weight (task
    # stride 0) is read in place, and must give what per-task copies give.
    gen = torch.Generator().manual_seed(3)
    tasks, a, c = 3, 5, 16
    shared = torch.randn(1, a, 3, 3, c, generator=gen).expand(tasks, a, 3, 3, c)
    gy = torch.randn(2, 6, 7, tasks * a, generator=gen)
    got = _input_grad(gy, shared, tasks, 2, c, 6, 7, [1, 1], [1, 1], [1, 1], channels_first)
    want = _input_grad(gy, shared.contiguous(), tasks, 2, c, 6, 7, [1, 1], [1, 1], [1, 1], channels_first)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), _input_oracle(gy, shared, tasks, (6, 7), [1, 1], [1, 1], [1, 1]),
                               atol=1e-4, rtol=1e-4)
