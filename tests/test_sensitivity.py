"""nf.neuron_sensitivity (SPEC section 3): every backend against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neuronml_fast as nf
from neuronml_fast import _extensions
from neuronml_fast.ops.sensitivity import neuron_sensitivity_op, neuron_sensitivity_reference

from conftest import gpu_backends, kernel_backends

BACKENDS = kernel_backends()


def _inputs(shape, dtype=torch.float64, device="cpu", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if not bias:
        return w, g, None, None
    b = torch.randn(shape[:1], generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    gb = torch.randn(shape[:1], generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return w, g, b, gb


def _run(backend, *args):
    with nf.use_backend(backend):
        return nf.neuron_sensitivity(*args)


def _check_against_reference(backend, args, rtol=1e-12, atol=1e-12):
    out = _run(backend, *args)
    expected = neuron_sensitivity_reference(*args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(
    shape=st.lists(st.integers(0, 7), min_size=2, max_size=5).map(tuple),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64_random_shapes(backend, device, shape, bias, seed):
    _check_against_reference(backend, _inputs(shape, device=device, bias=bias, seed=seed))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (64, 64, 3, 3), (37, 1001), (5, 3, 7, 1, 2), (300, 2)])
def test_matches_reference_float32(backend, device, shape):
    args = _inputs(shape, dtype=torch.float32, device=device)
    out = _run(backend, *args)
    expected = neuron_sensitivity_reference(*[a.double() for a in args])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * shape[1] ** 0.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded_bias"])
def test_non_contiguous_inputs(backend, device, layout):
    w, g, b, gb = _inputs((6, 5, 3, 3), device=device)
    if layout == "transposed":
        w, g = w.flatten(1).t().contiguous().t(), g.flatten(1).t().contiguous().t()
    elif layout == "sliced":
        w, g, b, gb = w[::2, :, 1:], g[::2, :, 1:], b[::2], gb[::2]
    elif layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded_bias":
        b = torch.tensor(0.5, dtype=b.dtype, device=device).expand(6)
    assert not (w.is_contiguous() and b.is_contiguous()) or layout == "channels_last"
    _check_against_reference(backend, (w, g, b, gb))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_layouts_of_weight_and_grad(backend, device):
    w, g, b, gb = _inputs((4, 3, 2, 5), device=device)
    _check_against_reference(backend, (w.contiguous(memory_format=torch.channels_last), g, b, gb))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0, 3, 3), (2, 0, 3, 3)])
def test_empty(backend, device, shape):
    _check_against_reference(backend, _inputs(shape, device=device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_taylor_sum_has_zero_gradient_like_abs(backend, device):
    w = torch.zeros(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.ones(3, 4, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad(_run(backend, w, g).sum(), w)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck(backend, device, bias):
    args = [a.requires_grad_() if a is not None else None for a in _inputs((4, 3, 2), device=device, bias=bias)]

    def f(*a):
        return _run(backend, *a)

    inputs = tuple(a for a in args if a is not None)
    fn = f if bias else (lambda w, g: f(w, g, None, None))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradients_match_reference(backend, device):
    args = [a.requires_grad_() for a in _inputs((5, 7), device=device)]
    upstream = torch.randn(5, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((_run(backend, *args) * upstream).sum(), args)
    expected = torch.autograd.grad((neuron_sensitivity_reference(*args) * upstream).sum(), args)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    for bias in (True, False):
        w, g, b, gb = _inputs((6, 3, 2), dtype=torch.float32, device=device, bias=bias)
        args = (w.requires_grad_(), g, b, gb, backend)
        torch.library.opcheck(neuron_sensitivity_op, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vmap_matches_loop(backend, device):
    w, g, _, _ = _inputs((3, 5, 4, 2), device=device)  # a batch of 3 layers of 5 neurons
    b, gb = torch.randn(2, 3, 5, dtype=torch.float64, device=device)
    with nf.use_backend(backend):
        batched = torch.vmap(nf.neuron_sensitivity)(w, g, b, gb)
        shared_grad = torch.vmap(nf.neuron_sensitivity, in_dims=(0, None, 0, None))(w, g[0], b, gb[0])
    torch.testing.assert_close(batched, torch.stack([neuron_sensitivity_reference(*a) for a in zip(w, g, b, gb)]))
    torch.testing.assert_close(
        shared_grad, torch.stack([neuron_sensitivity_reference(wi, g[0], bi, gb[0]) for wi, bi in zip(w, b)])
    )


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_torch_compile_fullgraph_inductor(backend, device):
    torch._dynamo.reset()
    w, g, b, gb = _inputs((8, 4, 3, 3), dtype=torch.float32, device=device)

    def f(w, g, b, gb):
        return nf.neuron_sensitivity(w * 2, g, b, gb).sqrt()

    compiled = torch.compile(f, fullgraph=True)
    for name in (backend, "reference"):  # switching backend must recompile, not reuse
        with nf.use_backend(name):
            torch.testing.assert_close(compiled(w, g, b, gb), f(w, g, b, gb))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph_with_backward(backend, device):
    torch._dynamo.reset()
    args = [a.requires_grad_() for a in _inputs((5, 3, 2), dtype=torch.float32, device=device)]

    def loss(w, g, b, gb):
        return nf.neuron_sensitivity(w, g, b, gb).square().sum()

    with nf.use_backend(backend):
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*args), args)
    want = torch.autograd.grad(loss(*args), args)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_)


def test_sixteen_bit_inputs_give_float32_sensitivity():
    # Deliberate choice, documented in the README: the result is the float32 accumulator.
    w, g, b, gb = _inputs((4, 9), dtype=torch.bfloat16)
    out = nf.neuron_sensitivity(w, g, b, gb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, neuron_sensitivity_reference(*[a.float() for a in (w, g, b, gb)]))


@pytest.mark.parametrize("backend,device", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu_accumulates_in_float32(backend, device, dtype):
    args = _inputs((256, 64, 3, 3), dtype=dtype, device=device)
    out = _run(backend, *args)
    expected = neuron_sensitivity_reference(*[a.double() for a in args])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-2)


# ---- bad input ---------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    w, g, b, gb = _inputs((4, 3))
    cases = [
        ((w.numpy(), g), TypeError, "weight: expected a torch.Tensor"),
        ((w.long(), g.long()), TypeError, "weight: expected a floating-point tensor"),
        ((w[0], g[0]), ValueError, r"weight: expected at least 2 dimensions, got shape \[3\]"),
        ((w, g[:, :2]), ValueError, r"grad_weight: expected shape \[4, 3\], got \[4, 2\]"),
        ((w, g.float()), TypeError, "grad_weight: expected dtype torch.float64 .*got torch.float32"),
        ((w, g.to("meta")), ValueError, "grad_weight: expected device cpu .*got meta"),
        ((w, g, b, None), ValueError, "bias and grad_bias: expected both or neither, got only bias"),
        ((w, g, None, gb), ValueError, "bias and grad_bias: expected both or neither, got only grad_bias"),
        ((w, g, b[:3], gb), ValueError, r"bias: expected shape \[4\], got \[3\]"),
        ((w, g, b, gb.float()), TypeError, "grad_bias: expected dtype torch.float64"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            nf.neuron_sensitivity(*args)


@pytest.mark.skipif(_extensions.cpu() is None, reason="cpu backend not built")
def test_cpu_binding_checks_instead_of_crashing():
    kernel = _extensions.cpu().neuron_sensitivity_out
    w, g = torch.randn(4, 3), torch.randn(4, 3)
    out = torch.empty(4), torch.empty(4)
    with pytest.raises(RuntimeError, match=r"grad_weight: expected shape \[4, 3\]"):
        kernel(w, g[:, :2], None, None, *out)
    with pytest.raises(RuntimeError, match="weight: expected a contiguous inner dimension"):
        kernel(w.t().contiguous().t(), g, None, None, *out)
    with pytest.raises(RuntimeError, match="bias and grad_bias: expected both or neither"):
        kernel(w, g, torch.randn(4), None, *out)
    with pytest.raises(RuntimeError, match="weight: expected dtype float32 or float64"):
        kernel(w.half(), g.half(), None, None, *out)
    with pytest.raises(RuntimeError, match=r"sensitivity \(out\): expected shape \[4\]"):
        kernel(w, g, None, None, torch.empty(3), out[1])
