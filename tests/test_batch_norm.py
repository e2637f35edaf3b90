"""batch_norm_rows: BN over the rows of a matrix with a fused double backward; what is particular to it.

Against eager autograd (first and second order, every subset of the first-order gradients weighted),
the fused double backward against its closed form (random shapes, every subset of u, u_gamma,
u_beta), gradcheck, gradgradcheck, opcheck and torch.compile: tests/test_oracle.py, over the rows
batch_norm_rows and batch_norm_rows_double_backward of tests/oracle.py.
"""

import pytest
import torch

from neuronml_fast import _extensions
from neuronml_fast.ops.batch_norm import batch_norm_rows

from oracle import batch_norm_sample

BACKENDS = ["reference"] + (["cpu"] if _extensions.load("_C_cpu") is not None else [])


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
