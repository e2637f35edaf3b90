"""The cross-cutting checks, written once over every op of the oracle table (tests/oracle.py), every
backend that runs it here and every dtype it supports: against the plain-PyTorch reference (odd
sizes, empty inputs, non-contiguous and channels-last variants, NaN-poisoned outputs), random
shapes, every subset of requires_grad, gradcheck and gradgradcheck, second order, torch.func.grad,
opcheck of the custom ops, vmap and torch.compile. The per-op files keep what is particular to an op."""

import itertools

import pytest
import torch
from hypothesis import assume, given, settings

import neuronml_fast as nf
from neuronml_fast import _alloc
from conftest import emulated_gpu, interpreted
from oracle import F32, F64, OPS, call, check_against_reference, assert_close, backends_of, dtypes_of, \
    gradients, leaves, upstream, well_posed


def _id(value):
    return str(value).replace("torch.", "")


def _params(*, variants=None, dtypes="all", with_backend=True, backend_filter=None, marks=None):
    """pytest params (op, variant, backend, device, dtype) from the table."""
    out = []
    for op in OPS.values():
        for variant in variants(op):
            for backend, device in backends_of(op):
                if backend_filter and not backend_filter(op, backend, device):
                    continue
                for dtype in dtypes(op, variant, backend):
                    reason = op.skip(backend, device, dtype, variant)
                    m = [pytest.mark.skip(reason=reason)] if reason else []
                    m += marks(op, backend, device) if marks else []
                    out.append(pytest.param(op.name, variant, backend, device, dtype, marks=m,
                                            id=f"{op.name}-{variant}-{backend}-{device}-{_id(dtype)}"))
    return out


# Variants that only the other families use.
_RESERVED = ("gradcheck", "compile", "layers", "maml")


def _reference_variants(op):
    return [v for v in op.variants if not v.startswith(_RESERVED)]


def _reference_dtypes(op, variant, backend):
    return dtypes_of(op, backend) if variant in op.dtype_variants else [F64]


@pytest.mark.parametrize("op,variant,backend,device,dtype",
                         _params(variants=_reference_variants, dtypes=_reference_dtypes))
def test_matches_reference(op, variant, backend, device, dtype):
    op = OPS[op]
    sample = op.sample(dtype, device, **op.variants[variant])
    # 16-bit: the outputs (the gradients' accuracy there is not a contract).
    check_against_reference(op, backend, device, dtype, sample, grads=dtype in (F64, F32), what=variant)


# ---- random shapes ---------------------------------------------------------------------------------


def _random_shape_test(op, strategy, max_examples):
    @pytest.mark.parametrize("backend,device", [pytest.param(b, d, id=f"{b}-{d}") for b, d in backends_of(op)])
    @settings(max_examples=max_examples)
    @given(knobs=strategy)
    def test(backend, device, knobs):
        sample = op.sample(F64, device, **knobs)
        assume(well_posed(op, sample))
        check_against_reference(op, backend, device, F64, sample, what=str(knobs))

    return test


for _op in OPS.values():
    for _name, (_strategy, _n) in _op.strategies.items():
        globals()[f"test_{_op.name}_{_name}_shapes"] = _random_shape_test(_op, _strategy, _n)


# ---- every subset of requires_grad -------------------------------------------------------------------
# A layer whose inputs only partly require gradients is ordinary use: learning the structure of a
# frozen backbone differentiates the mask alone, fine-tuning a head leaves the input constant. The
# backward ops then skip the gradients nobody asked for, and each such combination must still
# return fresh tensors and the reference's gradients.


def _subsets(names):
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


@pytest.mark.parametrize("op,variant,backend,device,dtype", _params(
    variants=lambda op: op.subsets_variants, dtypes=lambda op, v, b: [d for d in dtypes_of(op, b) if d in (F32, F64)]))
def test_every_subset_of_requires_grad(op, variant, backend, device, dtype):
    op = OPS[op]
    sample = op.sample(dtype, device, **op.variants[variant])
    names = sample.differentiable(op.grad_inputs)
    subsets = _subsets(names)
    if op.registry == "plastic" and interpreted(backend, device):
        # Up to 1023 subsets; the Triton interpreter takes ~0.2 s a call: each input alone and all together.
        subsets = [(n,) for n in names] + [names]
    for wanted in subsets:
        check_against_reference(op, backend, device, dtype, sample, wanted, what=variant)


# ---- gradcheck / gradgradcheck -----------------------------------------------------------------------


def _gradcheck_marks(op, backend, device):
    # a full float64 gradgradcheck of a masked conv: tens of seconds on 2 cores
    return [pytest.mark.slow] if op.registry == "masked_conv2d" else []


@pytest.mark.parametrize("op,variant,backend,device,dtype", _params(
    variants=lambda op: op.gradcheck_variants, dtypes=lambda op, v, b: [F64], marks=_gradcheck_marks))
def test_gradcheck(op, variant, backend, device, dtype):
    op = OPS[op]
    sample = op.sample(F64, device, **op.variants[variant])
    fast = op.fast_gradcheck_emulated and emulated_gpu(backend, device)

    def check(tensors, names):
        fixed = {k: v for k, v in tensors.items() if k not in names}

        def f(*values):
            return call(op, backend, {**fixed, **dict(zip(names, values))}, sample.options)

        inputs = tuple(tensors[k].detach().requires_grad_() for k in names)
        assert torch.autograd.gradcheck(f, inputs, fast_mode=fast), f"{op.name} on {backend}: gradcheck {names}"
        if op.gradgradcheck:
            assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast), f"{op.name} on {backend}: gradgradcheck"

    names = sample.differentiable(op.grad_inputs)
    if "mask" in names:
        # With skip_zero the output is not differentiable in the mask at mask == 0 (a pruned neuron
        # switching on): the other inputs with the mask as given, then all of them with the mask away from 0.
        check(sample.tensors, tuple(n for n in names if n != "mask"))
        check({**sample.tensors, "mask": sample.tensors["mask"].abs() + 0.5}, names)
    else:
        check(sample.tensors, names)


# ---- second order against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("op,variant,backend,device,dtype", _params(
    variants=lambda op: [v for v, _ in op.second_order],
    dtypes=lambda op, v, b: [d for d in op.second_order_dtypes if d in dtypes_of(op, b)]))
def test_second_order_matches_reference(op, variant, backend, device, dtype):
    """Gradients of (weighted) first-order gradients, w.r.t. the inputs and the upstream gradient."""
    op = OPS[op]
    every_subset = dict(op.second_order)[variant]
    sample = op.sample(dtype, device, **op.variants[variant])
    names = sample.differentiable(op.grad_inputs)
    args, ref_args = leaves(sample, names), leaves(sample, names, dtype=F64)
    out = call(op, backend, args, sample.options)
    want = op.reference(**ref_args, **sample.options)
    up_got = [u.detach().requires_grad_() for u in upstream(out)]
    up_want = [u.detach().double().requires_grad_() for u in up_got]
    with nf.use_backend(backend):
        first = gradients(out, args, names, weights=up_got, create_graph=True)
    first_want = gradients(want, ref_args, names, weights=up_want, create_graph=True)
    assert_close(dict(zip(names, first)), dict(zip(names, first_want)), op=op, backend=backend, dtype=dtype,
                 what="first-order grad")
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(w.shape, generator=gen, dtype=F64) for w in first_want]
    chosen = [c for c in _subsets(range(len(names)))] if every_subset else [tuple(range(len(names)))]
    for use in chosen:
        def loss(grads):
            return sum((g * w.to(g)).sum() for i, (g, w) in enumerate(zip(grads, weights))
                       if i in use and g is not None)

        wrt, wrt_want = [args[n] for n in names] + up_got, [ref_args[n] for n in names] + up_want
        with nf.use_backend(backend), _alloc.poisoned():
            have = torch.autograd.grad(loss(first), wrt, retain_graph=True, allow_unused=True)
        expect = torch.autograd.grad(loss(first_want), wrt_want, retain_graph=True, allow_unused=True)
        labels = list(names) + [f"upstream{i}" for i in range(len(up_got))]
        assert_close(dict(zip(labels, have)), dict(zip(labels, expect)), op=op, backend=backend, dtype=dtype,
                     what=f"second-order grad of the grads of {'+'.join(names[i] for i in use)}")


# ---- torch.func.grad ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,variant,backend,device,dtype", _params(
    variants=lambda op: list(op.functorch), dtypes=lambda op, v, b: [F64]))
def test_torch_func_grad_matches_the_reference(op, variant, backend, device, dtype):
    """torch.func.grad of a projection of the outputs, and torch.func.grad of a projection of that
    gradient (second order), against torch.autograd on the reference."""
    op = OPS[op]
    sample = op.sample(dtype, device, **op.variants[variant])
    names = sample.differentiable(op.grad_inputs)
    args, ref_args = leaves(sample, names), leaves(sample, names, dtype=F64)
    want = op.reference(**ref_args, **sample.options)
    up = upstream(want)
    first_want = gradients(want, ref_args, names, weights=up, create_graph=True)
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(g.shape, generator=gen, dtype=F64) for g in first_want]
    second_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(first_want, weights)),
                                      [ref_args[n] for n in names])

    def projection(values):
        out = op.fn(**{**args, **dict(zip(names, values))}, **sample.options)
        return sum((o * u.to(o)).sum() for o, u in zip(out if isinstance(out, tuple) else (out,), up))

    def projected_gradient(values):
        return sum((g * w.to(g)).sum() for g, w in zip(torch.func.grad(projection)(values), weights))

    values = tuple(args[n].detach() for n in names)
    with nf.use_backend(backend), _alloc.poisoned():
        first = torch.func.grad(projection)(values)
        second = torch.func.grad(projected_gradient)(values)
    assert_close(dict(zip(names, first)), dict(zip(names, first_want)), op=op, backend=backend, dtype=dtype,
                 what="torch.func.grad")
    assert_close(dict(zip(names, second)), dict(zip(names, second_want)), op=op, backend=backend, dtype=dtype,
                 what="torch.func.grad of torch.func.grad")


# ---- opcheck ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,variant,backend,device,dtype", _params(
    variants=lambda op: ["opcheck"] if op.opchecks else [], dtypes=lambda op, v, b: [F32],
    backend_filter=lambda op, b, d: b != "reference"))
def test_opcheck(op, variant, backend, device, dtype):
    for custom_op, args in OPS[op].opchecks(backend, device):
        torch.library.opcheck(custom_op, args)


# ---- vmap -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,variant,backend,device,dtype", _params(
    variants=lambda op: [f"{i}" for i in range(len(op.vmap))], dtypes=lambda op, v, b: [F64]))
def test_vmap_matches_the_reference_per_slice(op, variant, backend, device, dtype):
    # Ordinary autograd through the vmapped call too.
    op = OPS[op]
    name, in_dims = op.vmap[int(variant)]
    sample = op.sample(F64, device, **op.variants[name])
    # Inputs that are not vmapped are shared: the first slice of the batched sample.
    tensors = {k: v if v is None or k in in_dims else v[0] for k, v in sample.tensors.items()}
    sample = type(sample)(tensors, sample.options)
    names = sample.differentiable(op.grad_inputs)
    args, ref_args = leaves(sample, names), leaves(sample, names, dtype=F64)
    keys = list(args)
    dims = tuple(in_dims.get(k) for k in keys)

    def fn(*values):
        return op.fn(**dict(zip(keys, values)), **sample.options)

    with nf.use_backend(backend), _alloc.poisoned():
        out = torch.vmap(fn, in_dims=dims)(*[args[k] for k in keys])
    size = next(args[k].shape[0] for k in in_dims)
    want = torch.stack([op.reference(**{k: v if v is None or k not in in_dims else v[i] for k, v in ref_args.items()},
                                     **sample.options) for i in range(size)])
    assert_close(out, want, op=op, backend=backend, dtype=dtype, what=f"vmap over {sorted(in_dims)}")
    with nf.use_backend(backend):
        got_g = gradients(out, args, names)
    assert_close(dict(zip(names, got_g)), dict(zip(names, gradients(want, ref_args, names))), op=op, backend=backend,
                 dtype=dtype, what="grad through vmap")


# ---- torch.compile ----------------------------------------------------------------------------------


def _compile_params():
    out = []
    for op in OPS.values():
        for variant, compiler, on in op.compile:
            for backend, device in backends_of(op):
                if on is None or backend in on:
                    out.append(pytest.param(op.name, variant, compiler, backend, device,
                                            id=f"{op.name}-{compiler}-{backend}-{device}"))
    return out


@pytest.mark.parametrize("op,variant,compiler,backend,device", _compile_params())
def test_torch_compile_fullgraph(op, variant, compiler, backend, device):
    op = OPS[op]
    torch._dynamo.reset()
    sample = op.sample(F32, device, **op.variants[variant])
    names = sample.differentiable(op.grad_inputs)
    args = leaves(sample, names)

    def fn(**kw):
        return op.fn(**kw, **sample.options)

    # No FX graph cache: its key does not cover our ops' fake (meta) functions, so a graph compiled
    # before a fake changed would be reused with stale output strides.
    with nf.use_backend(backend), torch._inductor.config.patch(fx_graph_cache=False):
        got = torch.compile(fn, fullgraph=True, backend=compiler)(**args)
        got_g = gradients(got, args, names)
        want = fn(**args)
        want_g = gradients(want, args, names)
    assert_close(got, want, op=op, backend=backend, dtype=F32, what=f"{compiler} output")
    assert_close(dict(zip(names, got_g)), dict(zip(names, want_g)), op=op, backend=backend, dtype=F32,
                 what=f"{compiler} grad")


# ---- the harness itself ---------------------------------------------------------------------------


def test_the_comparator_names_what_differs_and_fails_on_an_unwritten_element():
    with _alloc.poisoned():
        unwritten = _alloc.empty((3,), dtype=F64, device="cpu")
    assert unwritten.isnan().all()  # what a kernel leaves in the elements it forgot to write
    want = (torch.zeros(3, dtype=F64), {"weight": torch.ones(2, dtype=F64)})
    got = (torch.cat([torch.zeros(2, dtype=F64), unwritten[:1]]), {"weight": torch.ones(2, dtype=F64)})
    with pytest.raises(AssertionError, match=r"masked_linear on cpu \(float64\): output\[0\] differs"):
        assert_close(got, want, op="masked_linear", backend="cpu", dtype=F64, what="output")
    got = (torch.zeros(3, dtype=F64), {"weight": torch.ones(2, dtype=F32)})
    assert_close(got, want, op="masked_linear", backend="cpu", dtype=F32, what="output")
    got[1]["weight"][1] = 1.1
    with pytest.raises(AssertionError, match=r"float32\): output\[1\]\['weight'\] differs"):
        assert_close(got, want, op="masked_linear", backend="cpu", dtype=F32, what="output")
