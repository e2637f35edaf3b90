"""batch_norm_rows: BN over the rows of a matrix with a fused double backward; what is particular to it.

Against eager autograd (first and second order, every subset of the first-order gradients weighted),
the fused double backward against its closed form (random shapes, every subset of u, u_gamma,
u_beta), gradcheck, gradgradcheck, opcheck and torch.compile: tests/test_oracle.py, over the rows
batch_norm_rows and batch_norm_rows_double_backward of tests/oracle.py, on every backend (the
Triton kernels under the interpreter). Here: MAML's use, and the Triton kernels' chunking.
"""

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import _alloc, _extensions
from neuronml_fast.ops.batch_norm import batch_norm_rows, batch_norm_rows_double_backward, \
    batch_norm_rows_double_backward_reference

from conftest import kernel_backends
from oracle import batch_norm_double_backward_sample, batch_norm_sample

BACKENDS = ["reference"] + (["cpu"] if _extensions.load("_C_cpu") is not None else [])
# (backend, device): every backend with a double-backward kernel that runs here (Triton on CPU
# tensors under the interpreter), and the reference.
PAIRS = [("reference", "cpu")] + [tuple(p.values) for p in kernel_backends()
                                  if nf.backends.supports("batch_norm_rows_double_backward", p.values[0], torch.float64)]
TRITON = [pair for pair in PAIRS if pair[0] == "triton"]


def _problem(rows, channels, dtype, seed):
    t = batch_norm_sample(dtype, rows=rows, channels=channels, seed=seed).tensors
    g = torch.randn(rows, channels, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return t["input"].requires_grad_(), t["weight"].requires_grad_(), t["bias"].requires_grad_(), g.to(dtype)


def _first_order(fn, x, w, b, g):
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), g.requires_grad_(), create_graph=True))


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


@pytest.mark.parametrize("backend,device", PAIRS)
def test_maml_meta_gradient_passes_gradcheck(backend, device):
    """One inner SGD step on BN's scale and shift on a support set, the loss on a query set at the
    adapted parameters: the meta-gradient differentiates the inner step's BN backward (the double
    backward) with respect to the initial parameters and the support set."""
    gen = torch.Generator().manual_seed(4)
    support = torch.randn(7, 3, generator=gen, dtype=torch.float64) * 2 + 1
    query = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(device)
    weight = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(3, generator=gen, dtype=torch.float64)

    def meta_loss(weight, bias, support):
        with nf.use_backend(backend), _alloc.poisoned():
            inner = batch_norm_rows(support, weight, bias).tanh().pow(2).sum()
            grad_weight, grad_bias = torch.autograd.grad(inner, (weight, bias), create_graph=True)
            adapted = batch_norm_rows(query, weight - 0.3 * grad_weight, bias - 0.3 * grad_bias)
            return adapted.sin().sum()

    inputs = tuple(t.to(device).requires_grad_() for t in (weight, bias, support))
    assert torch.autograd.gradcheck(meta_loss, inputs)


def _double_backward_args(rows, channels, dtype, device="cpu", parts=(True, True, True), seed=3, layout="contiguous"):
    t = batch_norm_double_backward_sample(dtype, device, rows=rows, channels=channels, parts=parts, seed=seed,
                                          layout=layout).tensors
    return [t[k] for k in ("u", "u_gamma", "u_beta", "grad_out", "input", "weight", "mean", "invstd")]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("parts,layout", [((True, True, True), "contiguous"), ((False, True, False), "transposed")])
def test_triton_sums_over_many_chunks_and_column_blocks(backend, device, parts, layout):
    # 1090 rows x 130 float64 channels: two column blocks (the second of 2 channels), 55 chunks of
    # 20 rows (5 row tiles of 4; the last chunk 10 rows), so every sum adds partial sums across programs.
    from neuronml_fast.ops.batch_norm import triton as launcher

    block_r, block_c = launcher._tile(130, 8)
    assert (block_r, block_c) == (4, 128)
    assert launcher._chunks(1090, 2, block_r) == (20, 55)
    args = _double_backward_args(1090, 130, torch.float64, device, parts, layout=layout)
    with nf.use_backend("triton"), _alloc.poisoned():
        got = batch_norm_rows_double_backward(*args)
    want = batch_norm_rows_double_backward_reference(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("rows,channels,block_r", [(1, 1, 64), (300, 140, 8), (1090, 130, 4), (10**6, 64, 16)])
def test_triton_chunks_cover_the_rows_once(rows, channels, block_r):
    pytest.importorskip("triton")
    from neuronml_fast.ops.batch_norm import triton as launcher

    per_chunk, chunks = launcher._chunks(rows, -(-channels // 128), block_r)
    assert per_chunk % block_r == 0 and chunks <= launcher.MAX_CHUNKS
    assert (chunks - 1) * per_chunk < rows <= chunks * per_chunk


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_double_backward_is_deterministic(backend, device):
    args = _double_backward_args(300, 140, torch.float32, device, seed=8)
    with nf.use_backend("triton"), _alloc.poisoned():
        first = batch_norm_rows_double_backward(*args)
        second = batch_norm_rows_double_backward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_double_backward_of_no_rows_is_zero(backend, device):
    args = _double_backward_args(4, 3, torch.float64, device)
    empty = [t[:0] if t.dim() == 2 else t for t in args]
    with nf.use_backend("triton"), _alloc.poisoned():
        d_grad_out, d_input, d_weight = batch_norm_rows_double_backward(*empty)
    assert d_grad_out.shape == d_input.shape == (0, 3)
    assert torch.equal(d_weight.cpu(), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_double_backward_checks_its_arguments(backend, device):
    args = _double_backward_args(4, 3, torch.float64, device)
    u, u_gamma, u_beta, g, x, w, mean, invstd = args
    cases = [
        ("grad_out", [u, u_gamma, u_beta, g[:, :2], x, w, mean, invstd]),
        ("u", [u.float(), u_gamma, u_beta, g, x, w, mean, invstd]),
        ("u_gamma", [u, u_gamma[:2], u_beta, g, x, w, mean, invstd]),
        ("weight", [u, u_gamma, u_beta, g, x, w[:1], mean, invstd]),
        ("invstd", [u, u_gamma, u_beta, g, x, w, mean, invstd.half()]),
        ("input", [u, u_gamma, u_beta, g, x[0], w, mean, invstd]),
    ]
    for name, bad in cases:
        with nf.use_backend(backend), pytest.raises((ValueError, TypeError), match=f"^{name}: expected"):
            batch_norm_rows_double_backward(*bad)
