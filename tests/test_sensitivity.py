"""nf.neuron_sensitivity (SPEC section 3): what is particular to the sensitivity.

Against the reference on every backend and dtype (16-bit on the GPU backends), random shapes,
non-contiguous, channels-last and empty inputs, every subset of requires_grad, gradcheck and
gradgradcheck, second order, opcheck, vmap and torch.compile with a backward: tests/test_oracle.py,
over the row neuron_sensitivity of tests/oracle.py.
"""

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import _extensions
from neuronml_fast.ops.sensitivity import neuron_sensitivity_reference

from conftest import kernel_backends
from oracle import sensitivity_sample

BACKENDS = kernel_backends()


def _inputs(shape, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """(weight, grad_weight, bias, grad_bias) of the oracle table's sample."""
    t = sensitivity_sample(dtype, device, shape=shape, bias=bias, seed=seed).tensors
    return t["weight"], t["grad_weight"], t["bias"], t["grad_bias"]


def _run(backend, *args):
    with nf.use_backend(backend):
        return nf.neuron_sensitivity(*args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_taylor_sum_has_zero_gradient_like_abs(backend, device):
    w = torch.zeros(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.ones(3, 4, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad(_run(backend, w, g).sum(), w)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_torch_compile_recompiles_when_the_backend_changes(backend, device):
    torch._dynamo.reset()
    w, g, b, gb = _inputs((8, 4, 3, 3), dtype=torch.float32, device=device)

    def f(w, g, b, gb):
        return nf.neuron_sensitivity(w * 2, g, b, gb).sqrt()

    compiled = torch.compile(f, fullgraph=True)
    for name in (backend, "reference"):  # switching backend must recompile, not reuse
        with nf.use_backend(name):
            torch.testing.assert_close(compiled(w, g, b, gb), f(w, g, b, gb))


def test_sixteen_bit_inputs_give_float32_sensitivity():
    # Deliberate choice, documented in the README: the result is the float32 accumulator.
    w, g, b, gb = _inputs((4, 9), dtype=torch.bfloat16)
    out = nf.neuron_sensitivity(w, g, b, gb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, neuron_sensitivity_reference(*[a.float() for a in (w, g, b, gb)]))


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
