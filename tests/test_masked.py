"""nf.masked_conv2d / nf.masked_linear (SPEC section 2): every backend against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neuronml_fast as nf
from neuronml_fast.ops import masked
from neuronml_fast.ops.masked import masked_conv2d_reference, masked_linear_reference

from conftest import emulated_gpu, gpu_backends, kernel_backends

# Kernel backends that can run here and have masked-layer kernels.
BACKENDS = [p for p in kernel_backends() if p.values[0] in nf.backends.ops()["masked_conv2d"].dtypes]


def _randn(*shape, device="cpu", dtype=torch.float64, gen=None):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _mask(shape, zeros, gen, device="cpu", dtype=torch.float64):
    m = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    m[torch.rand(shape, generator=gen) < zeros] = 0.0
    return m.to(device=device, dtype=dtype)


def _grads(out, inputs, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, upstream.to(out), allow_unused=True)


def _compare(backend, fn, reference, args, kwargs, *, atol=1e-10, rtol=1e-10):
    with nf.use_backend(backend):
        out = fn(*args, **kwargs)
    expected = reference(*args, **kwargs)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    if any(a is not None and a.requires_grad for a in args):
        with nf.use_backend(backend):
            got = _grads(fn(*args, **kwargs), args)
        want = _grads(expected, args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
    return out


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    tasks = draw(st.sampled_from([None, 1, 3]))
    return dict(
        tasks=tasks, batch=draw(st.integers(0, 3)), c_in=groups * draw(st.integers(1, 3)),
        c_out=groups * draw(st.integers(1, 4)), h=draw(st.integers(1, 7)), w=draw(st.integers(1, 6)),
        k=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 1))), dilation=draw(st.integers(1, 2)),
        groups=groups, bias=draw(st.booleans()), zeros=draw(st.sampled_from([0.0, 0.4, 1.0])),
        skip_zero=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _conv_args(p, device="cpu", dtype=torch.float64, grad=True):
    gen = torch.Generator().manual_seed(p["seed"])
    t = () if p["tasks"] is None else (p["tasks"],)
    x = _randn(*t, p["batch"], p["c_in"], p["h"], p["w"], device=device, dtype=dtype, gen=gen)
    w = _randn(*t, p["c_out"], p["c_in"] // p["groups"], *p["k"], device=device, dtype=dtype, gen=gen)
    m = _mask((*t, p["c_out"]), p["zeros"], gen, device, dtype)
    b = _randn(*t, p["c_out"], device=device, dtype=dtype, gen=gen) if p["bias"] else None
    if grad:
        for a in (x, w, m, b):
            if a is not None:
                a.requires_grad_()
    return (x, w, m, b), dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
                              skip_zero=p["skip_zero"])


def _fits(p):
    for i, size in enumerate((p["h"], p["w"])):
        if size + 2 * p["padding"][i] < p["dilation"] * (p["k"][i] - 1) + 1:
            return False
    return True


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(p=conv_problems())
def test_conv_matches_reference_random_shapes(backend, device, p):
    if not _fits(p):
        return
    args, kwargs = _conv_args(p, device)
    _compare(backend, nf.masked_conv2d, masked_conv2d_reference, args, kwargs)


@st.composite
def linear_problems(draw):
    return dict(tasks=draw(st.sampled_from([None, 1, 4])), lead=draw(st.sampled_from([(0,), (1,), (5,), (2, 3)])),
                d_in=draw(st.integers(1, 9)), d_out=draw(st.integers(1, 9)), bias=draw(st.booleans()),
                zeros=draw(st.sampled_from([0.0, 0.5, 1.0])), skip_zero=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _linear_args(p, device="cpu", dtype=torch.float64, grad=True):
    gen = torch.Generator().manual_seed(p["seed"])
    t = () if p["tasks"] is None else (p["tasks"],)
    x = _randn(*t, *p["lead"], p["d_in"], device=device, dtype=dtype, gen=gen)
    w = _randn(*t, p["d_out"], p["d_in"], device=device, dtype=dtype, gen=gen)
    m = _mask((*t, p["d_out"]), p["zeros"], gen, device, dtype)
    b = _randn(*t, p["d_out"], device=device, dtype=dtype, gen=gen) if p["bias"] else None
    if grad:
        for a in (x, w, m, b):
            if a is not None:
                a.requires_grad_()
    return (x, w, m, b), dict(skip_zero=p["skip_zero"])


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(p=linear_problems())
def test_linear_matches_reference_random_shapes(backend, device, p):
    args, kwargs = _linear_args(p, device)
    _compare(backend, nf.masked_linear, masked_linear_reference, args, kwargs)


CONV_BASE = dict(tasks=None, batch=3, c_in=4, c_out=6, h=6, w=5, k=(3, 3), stride=(1, 1), padding=(1, 1),
                 dilation=1, groups=1, bias=True, zeros=0.4, skip_zero=True, seed=3)
LINEAR_BASE = dict(tasks=None, lead=(4,), d_in=5, d_out=6, bias=True, zeros=0.4, skip_zero=True, seed=3)


def _problem(kind, **changes):
    base = CONV_BASE if kind == "conv" else LINEAR_BASE
    p = {**base, **changes}
    return (_conv_args if kind == "conv" else _linear_args), p


def _fn(kind):
    return (nf.masked_conv2d, masked_conv2d_reference) if kind == "conv" else (nf.masked_linear, masked_linear_reference)


@pytest.mark.slow  # a full float64 gradgradcheck of a conv: tens of seconds on 2 cores
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("tasks", [None, 2])
@pytest.mark.parametrize("skip_zero", [True, False])
def test_gradcheck_and_gradgradcheck(backend, device, kind, tasks, skip_zero):
    make, p = _problem(kind, tasks=tasks, skip_zero=skip_zero, batch=2, lead=(3,), h=4, w=4, c_out=4, d_out=4)
    (x, w, m, b), kwargs = make(p, device)
    fn = _fn(kind)[0]
    # With skip_zero the output is not differentiable in the mask at mask == 0 (a pruned
    # neuron switching on), so the mask is checked separately, away from 0.
    m_nonzero = (m.detach().abs() + 0.5).requires_grad_()

    def f(x, w, m, b):
        with nf.use_backend(backend):
            return fn(x, w, m, b, **kwargs)

    # The Triton interpreter and the CUDA emulation are slow: check random directions (fast_mode)
    # instead of every element there; the full-gradient comparisons above cover the rest.
    fast = emulated_gpu(backend, device)
    assert torch.autograd.gradcheck(lambda x, w, b: f(x, w, m.detach(), b), (x, w, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(lambda x, w, b: f(x, w, m.detach(), b), (x, w, b), fast_mode=fast)
    assert torch.autograd.gradcheck(f, (x, w, m_nonzero, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, (x, w, m_nonzero, b), fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_pruned_neurons_are_exact_zeros_with_zero_gradients(backend, device, kind):
    make, p = _problem(kind, tasks=2, zeros=0.0)
    (x, w, m, b), kwargs = make(p, device, grad=False)
    m[0, 1] = 0.0
    m[1, 0] = m[1, 3] = 0.0
    w[0, 1] = float("inf")  # a pruned neuron is never computed, so even inf weights stay silent
    w[1, 3] = float("nan")
    for t in (x, w, m, b):
        t.requires_grad_()
    with nf.use_backend(backend):
        out = _fn(kind)[0](x, w, m, b, **kwargs)
        gx, gw, gm, gb = torch.autograd.grad(out.sum(), (x, w, m, b))
    pruned = [(0, 1), (1, 0), (1, 3)]
    for t, c in pruned:
        assert torch.equal(out[t].select(-1 if kind == "linear" else 1, c),
                           torch.zeros_like(out[t].select(-1 if kind == "linear" else 1, c)))
        assert torch.equal(gw[t, c], torch.zeros_like(gw[t, c]))
        assert gb[t, c].item() == 0 and gm[t, c].item() == 0
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_all_zero_mask(backend, device, kind):
    make, p = _problem(kind, zeros=1.0)
    args, kwargs = make(p, device)
    out = _compare(backend, *_fn(kind), args, kwargs)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_weight"])
def test_conv_non_contiguous_inputs(backend, device, layout):
    make, p = _problem("conv")
    (x, w, m, b), kwargs = make(p, device, grad=False)
    if layout == "channels_last":
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, m, b = torch.cat([x, x], 1)[:, ::2], torch.stack([m, m], 1)[:, 0], torch.stack([b, b], 1)[:, 1]
    else:
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
    args = tuple(a.requires_grad_() for a in (x, w, m, b))
    _compare(backend, nf.masked_conv2d, masked_conv2d_reference, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_linear_non_contiguous_inputs(backend, device):
    make, p = _problem("linear", lead=(6,))
    (x, w, m, b), kwargs = make(p, device, grad=False)
    args = tuple(a.requires_grad_() for a in (x.t().contiguous().t(), w.t().contiguous().t(), m, b))
    _compare(backend, nf.masked_linear, masked_linear_reference, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_task_batched_equals_stacked_single_tasks(backend, device, kind):
    make, p = _problem(kind, tasks=4)
    (x, w, m, b), kwargs = make(p, device, grad=False)
    fn = _fn(kind)[0]
    with nf.use_backend(backend):
        batched = fn(x, w, m, b, **kwargs)
        singles = torch.stack([fn(x[t], w[t], m[t], b[t], **kwargs) for t in range(4)])
    torch.testing.assert_close(batched, singles)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_vmap_over_tasks_is_task_batching(backend, device, kind):
    # torch.func.grad cannot see through torch.library custom ops with registered autograd
    # (a torch limitation); vmap can, and ordinary autograd works through the vmapped call.
    make, p = _problem(kind, tasks=3)
    (x, w, m, b), kwargs = make(p, device)
    fn, reference = _fn(kind)
    with nf.use_backend(backend):
        out = torch.vmap(lambda x, w, m, b: fn(x, w, m, b, **kwargs))(x, w, m, b)
        got = torch.autograd.grad(out.square().sum(), (x, w, m, b))
    expected = reference(x, w, m, b, **kwargs)
    torch.testing.assert_close(out, expected)
    for g, e in zip(got, torch.autograd.grad(expected.square().sum(), (x, w, m, b))):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_second_order_maml_step_matches_reference(backend, device):
    # One inner SGD step on the support set, the meta-gradient of the query loss through it.
    make, p = _problem("conv", tasks=2, zeros=0.3)
    (x, w, m, b), kwargs = make(p, device)
    query = x.detach().flip(1)

    def meta_grads(fn):
        inner = fn(x, w, m, b, **kwargs).square().mean()
        gw, gb = torch.autograd.grad(inner, (w, b), create_graph=True)
        outer = fn(query, w - 0.1 * gw, m, b - 0.1 * gb, **kwargs).tanh().sum()
        return torch.autograd.grad(outer, (x, w, m, b))

    with nf.use_backend(backend):
        got = meta_grads(nf.masked_conv2d)
    want = meta_grads(masked_conv2d_reference)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    make, p = _problem("conv", tasks=2)
    (x, w, m, b), kwargs = make(p, device, dtype=torch.float32)
    conv_args = (x, w, m, b, [1, 1], [1, 1], [1, 1], 1, False, False, True, backend)
    torch.library.opcheck(masked.masked_conv2d_op, conv_args)
    out, pre = masked.masked_conv2d_op(*conv_args)
    go = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(masked.masked_conv2d_backward_op,
                          (go, None, x, w, m, pre.detach(), [1, 1], [1, 1], [1, 1], 1, False, True, True, True, backend))
    torch.library.opcheck(masked.masked_conv2d_backward_op,  # the input gradient in the caller's layout
                          (go, None, x, w, m, pre.detach(), [1, 1], [1, 1], [1, 1], 1, True, True, True, True, backend))
    make, p = _problem("linear", tasks=2)
    (x, w, m, b), kwargs = make(p, device, dtype=torch.float32)
    torch.library.opcheck(masked.masked_linear_op, (x, w, m, b, True, backend))
    out, pre = masked.masked_linear_op(x, w, m, b, True, backend)
    go = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(masked.masked_linear_backward_op, (go, go, x, w, m, pre.detach(), False, True, False, backend))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    make, p = _problem("conv")
    (x, w, m, b), kwargs = make(p, device, dtype=torch.float32)

    def step(x, w, m, b):
        h = nf.masked_conv2d(x, w, m, b, **kwargs).relu()
        return nf.masked_linear(h.flatten(1), w.flatten(1)[:, : h[0].numel()].repeat(1, 100)[:, : h[0].numel()], m, b).sum()

    # No FX graph cache: its key does not cover our ops' fake (meta) functions, so a graph compiled
    # before a fake changed would be reused with stale output strides.
    with nf.use_backend(backend), torch._inductor.config.patch(fx_graph_cache=False):
        got = torch.compile(step, fullgraph=True)(x, w, m, b)
        got_grads = torch.autograd.grad(got, (x, w, m, b))
        want = step(x, w, m, b)
        want_grads = torch.autograd.grad(want, (x, w, m, b))
    torch.testing.assert_close(got, want)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend,device", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_low_precision_against_float64_reference(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584)")
    size = dict(batch=2, h=7, w=7) if emulated_gpu(backend, device) else dict(batch=8, h=14, w=14)
    make, p = _problem("conv", tasks=3, c_in=16, c_out=32, zeros=0.5, **size)
    (x, w, m, b), kwargs = make(p, device, dtype=dtype, grad=False)
    with nf.use_backend(backend):
        out = nf.masked_conv2d(x, w, m, b, **kwargs)
    expected = masked_conv2d_reference(*[t.double() for t in (x, w, m, b)], **kwargs)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_problem_matches_reference(backend):
    make, p = _problem("conv", tasks=4, batch=40, c_in=64, c_out=64, h=14, w=14, zeros=0.5, seed=5)
    args, kwargs = make(p, "cuda")
    _compare(backend, nf.masked_conv2d, masked_conv2d_reference, args, kwargs, atol=1e-9, rtol=1e-9)


# ---- bad input ---------------------------------------------------------------------------


def test_conv_bad_inputs_name_the_argument():
    (x, w, m, b), _ = _conv_args({**CONV_BASE, "tasks": None}, grad=False)
    cases = [
        ((x[0], w, m, b), {}, ValueError, r"input: expected \[N, C_in, H, W\]"),
        ((x, w[0], m, b), {}, ValueError, "weight: expected a 4-d tensor"),
        ((x, w[:, :3], m, b), {}, ValueError, "weight: expected C_in/groups = 4/1"),
        ((x, w, m[:4], b), {}, ValueError, r"mask: expected shape \[6\], got \[4\]"),
        ((x, w, m > 0, b), {}, TypeError, "mask: expected a floating-point tensor"),
        ((x, w, m.float(), b), {}, TypeError, "mask: expected dtype torch.float64"),
        ((x, w, m, b[:2]), {}, ValueError, r"bias: expected shape \[6\], got \[2\]"),
        ((x, w.to("meta"), m, b), {}, ValueError, "weight: expected device cpu"),
        ((x, w, m, b), {"groups": 4}, ValueError, "weight: expected C_in/groups"),
        ((x, w, m, b), {"groups": 0}, ValueError, "groups: expected a positive int"),
        ((x, w, m, b), {"stride": 0}, ValueError, "stride, padding, dilation: expected stride >= 1"),
        ((x, w, m, b), {"padding": (1, 2, 3)}, TypeError, "padding: expected an int or a pair of ints"),
        ((x[..., :1, :1], w, m, b), {}, ValueError, "input: spatial size"),
        ((x.unsqueeze(0), w.unsqueeze(0).expand(2, -1, -1, -1, -1), m, b), {}, ValueError, "weight: expected 1 tasks"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            nf.masked_conv2d(*args, **kwargs)


def test_linear_bad_inputs_name_the_argument():
    (x, w, m, b), _ = _linear_args({**LINEAR_BASE}, grad=False)
    cases = [
        ((x, w[0], m, b), ValueError, r"weight: expected \[out, in\]"),
        ((x[:, :3], w, m, b), ValueError, "input: expected 5 features"),
        ((x, w.unsqueeze(0), m.unsqueeze(0), b.unsqueeze(0)), ValueError, r"input: expected \[T=1, \.\.\., in\]"),
        ((x, w, m.int(), b), TypeError, "mask: expected a floating-point tensor"),
        ((x.float(), w, m, b), TypeError, "weight: expected dtype torch.float32"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            nf.masked_linear(*args)


@pytest.mark.skipif("cpu" not in nf.backends.available(), reason="cpu backend not built")
def test_cpu_epilogue_binding_checks_instead_of_crashing():
    from neuronml_fast import _extensions

    ext = _extensions.cpu()
    out = torch.empty(1, 2, 4, 3)  # [T, N, S, C]
    slot = torch.tensor([[0, 1, -1]])
    mask = torch.ones(1, 3)
    with pytest.raises(RuntimeError, match="slot: entries must lie in"):
        ext.masked_forward_epilogue_out(torch.zeros(1, 2, 4, 2), torch.tensor([[0, 5, -1]]), mask, None, out,
                                       out.clone())
    with pytest.raises(RuntimeError, match=r"mask: expected shape \[1, 3\]"):
        ext.masked_forward_epilogue_out(torch.zeros(1, 2, 4, 2), slot, torch.ones(3), None, out, out.clone())
    with pytest.raises(RuntimeError, match="y: expected a \\[T, N, S, slots\\] view"):
        ext.masked_forward_epilogue_out(torch.zeros(2, 4, 2), slot, mask, None, out, out.clone())
    with pytest.raises(RuntimeError, match="pre: expected shape"):
        ext.masked_forward_epilogue_out(torch.zeros(1, 2, 4, 2), slot, mask, None, out, torch.empty(1, 2, 3, 4))


@pytest.mark.skipif(not nf.backends.status("cpu").devices, reason="C++ CPU extension not built")
def test_cpu_bias_and_mask_gradients_are_the_same_on_every_run():
    # The float64 prologue sums over images and pixels on every thread; the partial sums must be
    # merged in a fixed order, or the gradients differ in their last bits from run to run.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 20, 20, generator=gen, dtype=torch.float64)
    w = torch.randn(24, 16, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(8, 24, 20, 20, generator=gen, dtype=torch.float64)

    def grads():
        m = torch.rand(24, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
        b = torch.zeros(24, dtype=torch.float64, requires_grad=True)
        with nf.use_backend("cpu"):
            nf.masked_conv2d(x, w, m, b, padding=1).backward(g)
        return b.grad, m.grad

    first = grads()
    for _ in range(6):
        again = grads()
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_output_memory_format_follows_the_input(backend, device, layout):
    # torch's conv2d rule, which a model written for nn.Conv2d relies on (x.view(N, -1) after it).
    gen = torch.Generator().manual_seed(5)
    x = _randn(2, 3, 6, 5, device=device, dtype=torch.float32, gen=gen)
    w = _randn(4, 3, 3, 3, device=device, dtype=torch.float32, gen=gen)
    m = _mask((4,), 0.4, gen, device, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.conv2d(x, w, padding=1)
    with nf.use_backend(backend):
        out = nf.masked_conv2d(x, w, m, padding=1)
    assert out.stride() == want.stride()
    torch.testing.assert_close(out, masked_conv2d_reference(x, w, m, padding=1), atol=1e-4, rtol=1e-4)
