"""Every subset of differentiable inputs, on every backend, in float32 and float64.

A layer whose inputs only partly require gradients is ordinary use: learning the structure of a
frozen backbone differentiates the mask alone, fine-tuning a head leaves the input constant. The
backward ops then skip the gradients nobody asked for, and each such combination must still
return fresh tensors (a custom op's outputs may not alias its inputs or each other) and the
reference's gradients.
"""

import itertools

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast.ops.masked import masked_conv2d_reference, masked_linear_reference
from neuronml_fast.ops.plastic import plastic_linear_reference, plastic_rnn_reference
from neuronml_fast.ops.sensitivity import neuron_sensitivity_reference

from conftest import interpreted, kernel_backends

F64 = torch.float64
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(F64, id="float64")]
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), F64: dict(atol=1e-10, rtol=1e-10)}


def _backends(op):
    return [p for p in kernel_backends() if p.values[0] in nf.backends.ops()[op].dtypes]


def _subsets(names):
    """Every non-empty subset of ``names``, as tuples in the order given."""
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def _subset_params(names):
    return [pytest.param(s, id="+".join(s)) for s in _subsets(names)]


def _values(seed, **shapes):
    """float64 tensors of the given shapes (a float is a 0-d tensor of that value, None stays None)."""
    gen = torch.Generator().manual_seed(seed)
    made = {}
    for name, shape in shapes.items():
        if shape is None or isinstance(shape, float):
            made[name] = None if shape is None else torch.tensor(shape, dtype=F64)
        else:
            made[name] = torch.randn(shape, generator=gen, dtype=F64)
    return made


def _leaves(values, wanted, dtype, device):
    return {k: None if v is None else v.to(device=device, dtype=dtype, copy=True).requires_grad_(k in wanted)
            for k, v in values.items()}


def _gradients(outputs, args, wanted, seed=11):
    """Gradients of a random projection of ``outputs`` with respect to ``args[wanted]``; an input the
    outputs do not depend on gets a zero gradient."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64).to(o)).sum() for o in outputs)
    inputs = [args[k] for k in wanted]
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def _check_subset(backend, device, dtype, fn, reference, values, wanted, options=None):
    """``fn`` on ``backend`` with only ``wanted`` requiring grad, against ``reference`` in float64."""
    options = options or {}
    args = _leaves(values, wanted, dtype, device)
    with nf.use_backend(backend):
        got = _gradients(fn(**args, **options), args, wanted)
    ref_args = _leaves(values, wanted, F64, "cpu")
    want = _gradients(reference(**ref_args, **options), ref_args, wanted)
    for name, g, w in zip(wanted, got, want):
        assert g.shape == w.shape, f"{name} with {wanted} requiring grad: shape {list(g.shape)}, want {list(w.shape)}"
        torch.testing.assert_close(g.cpu().double(), w, **TOLERANCE[dtype],
                                   msg=lambda m, n=name: f"grad {n} with {wanted} requiring grad: {m}")


# ---- masked_conv2d / masked_linear ------------------------------------------------------------

MASKED_INPUTS = ("input", "weight", "mask", "bias")
# One pruned neuron (exact 0, skipped) and one fractional mask value.
MASK = torch.tensor([1.0, 0.0, 0.6], dtype=F64)


def _masked_values(kind):
    shapes = dict(input=(2, 2, 4, 4), weight=(3, 2, 3, 3), bias=(3,)) if kind == "conv" else \
        dict(input=(4, 5), weight=(3, 5), bias=(3,))
    values = _values(3, **shapes)
    values["mask"] = MASK
    return values


@pytest.mark.parametrize("backend,device", _backends("masked_conv2d"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("wanted", _subset_params(MASKED_INPUTS))
def test_masked_layers_any_subset_of_inputs_requires_grad(backend, device, dtype, kind, wanted):
    fn, reference, options = (nf.masked_conv2d, masked_conv2d_reference, dict(padding=1)) if kind == "conv" else \
        (nf.masked_linear, masked_linear_reference, {})
    _check_subset(backend, device, dtype, fn, reference, _masked_values(kind), wanted, options)


# ---- neuron_sensitivity -------------------------------------------------------------------------

SENSITIVITY_INPUTS = ("weight", "grad_weight", "bias", "grad_bias")


@pytest.mark.parametrize("backend,device", _backends("neuron_sensitivity"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wanted", _subset_params(SENSITIVITY_INPUTS))
def test_sensitivity_any_subset_of_inputs_requires_grad(backend, device, dtype, wanted):
    values = _values(5, weight=(4, 3, 2), grad_weight=(4, 3, 2), bias=(4,), grad_bias=(4,))
    _check_subset(backend, device, dtype, nf.neuron_sensitivity, neuron_sensitivity_reference, values, wanted)


# ---- plastic_linear / plastic_rnn ---------------------------------------------------------------
# Up to 127 subsets per configuration: one test per configuration loops over them (the message
# names the subset). The Triton interpreter takes ~0.2 s a call, so there each input alone and
# all of them together are checked.

T, B, N, D_IN = 3, 2, 4, 3
PLASTIC_CONFIGS = {
    "linear": (nf.plastic_linear, plastic_linear_reference,
               dict(input=(T, B, D_IN), weight=(N, D_IN), alpha=(N, D_IN), eta=0.2, hebb=(B, N, D_IN), bias=(N,),
                    drive=(T, B, N))),
    "rnn": (nf.plastic_rnn, plastic_rnn_reference,
            dict(input=(T, B, N), weight=(N, N), alpha=(N, N), eta=0.2, y0=(B, N), hebb=(B, N, N))),
    # eta is unused under modulation: its gradient is zero (the reference: none at all).
    "rnn-modulated": (nf.plastic_rnn, plastic_rnn_reference,
                      dict(input=(T, B, N), weight=(N, N), alpha=(N, N), eta=0.2, y0=(B, N), hebb=(B, N, N),
                           modulation=(T, B, N))),
}


def _plastic_subsets(backend, device, names):
    if interpreted(backend, device):
        return [(name,) for name in names] + [tuple(names)]
    return _subsets(names)


@pytest.mark.parametrize("backend,device", _backends("plastic"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(PLASTIC_CONFIGS))
def test_plastic_any_subset_of_inputs_requires_grad(backend, device, dtype, config):
    fn, reference, shapes = PLASTIC_CONFIGS[config]
    values = _values(7, **shapes)
    for name in ("weight", "alpha", "hebb"):  # a moderate trace keeps tanh away from saturation
        values[name] = 0.4 * values[name]
    for wanted in _plastic_subsets(backend, device, list(values)):
        _check_subset(backend, device, dtype, fn, reference, values, wanted)
