"""batch_norm_rows: BN over the rows of a matrix with a fused double backward, against autograd."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import neuronml_fast as nf
from neuronml_fast import _alloc, _extensions
from neuronml_fast.ops.batch_norm import batch_norm_rows, batch_norm_rows_double_backward_reference

BACKENDS = ["reference"] + (["cpu"] if _extensions.load("_C_cpu") is not None else [])
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def _problem(rows, channels, dtype, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    x = randn(rows, channels) * 3 + 1
    if layout == "transposed":  # a non-contiguous input
        x = x.t().contiguous().t()
    return x.requires_grad_(), randn(channels).requires_grad_(), randn(channels).requires_grad_(), randn(rows, channels)


def _first_order(fn, x, w, b, g):
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), g.requires_grad_(), create_graph=True))


def _eager(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("upstream", [u for u in itertools.product([False, True], repeat=3) if any(u)])
def test_double_backward_matches_autograd(backend, dtype, upstream):
    x, w, b, g = _problem(37, 6, dtype, seed=3)
    expected = _first_order(_eager, x, w, b, g)
    with nf.use_backend(backend), _alloc.poisoned():
        got = _first_order(batch_norm_rows, x, w, b, g)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, **TOL[dtype])
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for t in expected[1:]]

    def loss(outs):
        return sum((o * u).sum() for o, u, use in zip(outs[1:], weights, upstream) if use)

    want = torch.autograd.grad(loss(expected), (g, x, w), allow_unused=True)
    with nf.use_backend(backend), _alloc.poisoned():
        have = torch.autograd.grad(loss(got), (g, x, w))
    for h, e in zip(have, want):
        torch.testing.assert_close(h, torch.zeros_like(h) if e is None else e, **TOL[dtype])


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 40), channels=st.integers(1, 19), seed=st.integers(0, 2**16),
       layout=st.sampled_from(["contiguous", "transposed"]))
def test_kernel_matches_closed_form(rows, channels, seed, layout):
    if "cpu" not in BACKENDS:
        pytest.skip("C++ CPU extension not built")
    x, w, _, g = _problem(rows, channels, torch.float64, seed, layout)
    x, w = x.detach(), w.detach()
    mean = x.mean(0)
    invstd = ((x - mean).pow(2).mean(0) + 1e-5).rsqrt()
    gen = torch.Generator().manual_seed(seed + 1)
    u, ug, ub = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((rows, channels), channels, channels))
    for parts in itertools.product([None, 0], [None, 1], [None, 2]):
        args = [(u, ug, ub)[i] if i is not None else None for i in parts]
        want = batch_norm_rows_double_backward_reference(*args, g, x, w, mean, invstd)
        with nf.use_backend("cpu"), _alloc.poisoned():
            from neuronml_fast.ops.batch_norm import batch_norm_rows_double_backward
            have = batch_norm_rows_double_backward(*args, g, x, w, mean, invstd)
        for h, e in zip(have, want):
            torch.testing.assert_close(h, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    x, w, b, _ = _problem(6, 3, torch.float64, seed=11)
    with nf.use_backend(backend):
        assert torch.autograd.gradcheck(batch_norm_rows, (x, w, b))
        assert torch.autograd.gradgradcheck(batch_norm_rows, (x, w, b))


def test_third_derivative_raises():
    x, w, b, g = _problem(5, 2, torch.float64, seed=1)
    _, gx, _, _ = _first_order(batch_norm_rows, x, w, b, g)
    (hx,) = torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(hx.sum(), x)


def test_bad_inputs():
    x, w, b, _ = _problem(4, 3, torch.float64, seed=0)
    with pytest.raises(ValueError, match="input"):
        batch_norm_rows(x.detach().view(2, 2, 3), w, b)
    with pytest.raises(ValueError, match="weight"):
        batch_norm_rows(x, w[:2], b)
    with pytest.raises(ValueError, match="bias"):
        batch_norm_rows(x, w, b[:1])
    with pytest.raises(ValueError, match="rows"):
        batch_norm_rows(x[:1], w, b)
    with pytest.raises(ValueError, match="eps"):
        batch_norm_rows(x, w, b, eps=0.0)
    with pytest.raises(TypeError, match="input"):
        batch_norm_rows(x.detach().long(), w, b)


def test_kernel_checks_its_arguments():
    if "cpu" not in BACKENDS:
        pytest.skip("C++ CPU extension not built")
    kernel = _extensions.load("_C_cpu").batch_norm_rows_double_backward_out
    x = torch.randn(4, 3, dtype=torch.float64)
    v = torch.ones(3, dtype=torch.float64)
    out = lambda: torch.empty(4, 3, dtype=torch.float64)  # noqa: E731
    with pytest.raises(RuntimeError, match="grad_out"):
        kernel(None, None, None, torch.randn(4, 2, dtype=torch.float64), x, v, v, v, out(), out(), v.clone())
    with pytest.raises(RuntimeError, match="u"):
        kernel(torch.randn(3, 4, dtype=torch.float64).t(), None, None, x, x, v, v, v, out(), out(), v.clone())
    with pytest.raises(RuntimeError, match="invstd"):
        kernel(None, None, None, x, x, v, v, v.float(), out(), out(), v.clone())


def test_torch_compile_fullgraph():
    x, w, b, g = _problem(9, 4, torch.float32, seed=2)
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(lambda x, w, b: batch_norm_rows(x, w, b).relu(), fullgraph=True)
        got = compiled(x, w, b)
        got_grads = torch.autograd.grad(got, (x, w, b), g)
    want = _eager(x, w, b).relu()
    torch.testing.assert_close(got, want)
    for h, e in zip(got_grads, torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(h, e, atol=1e-5, rtol=1e-5)
