"""nf.masked_conv2d / nf.masked_linear (SPEC section 2): what is particular to the masked layers.

Against the reference on every backend and dtype, random shapes, every subset of requires_grad,
gradcheck, second order, opcheck, vmap, torch.compile, non-contiguous, channels-last and empty
inputs: tests/test_oracle.py, over the rows masked_conv2d and masked_linear of tests/oracle.py.
"""

import contextlib
import dataclasses

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast.ops.masked import masked_conv2d_reference, masked_linear_reference

from conftest import kernel_backends
from oracle import F64, OPS, check_against_reference, conv_sample, linear_sample

# Kernel backends that can run here and have masked-layer kernels.
BACKENDS = [p for p in kernel_backends() if p.values[0] in nf.backends.ops()["masked_conv2d"].dtypes]


def _problem(kind, device="cpu", dtype=F64, **knobs):
    """(input, weight, mask, bias), options of the table's base sample with ``knobs`` changed."""
    sample = (conv_sample if kind == "conv" else linear_sample)(dtype, device, **knobs)
    return tuple(sample.tensors[k] for k in ("input", "weight", "mask", "bias")), sample.options


def _fn(kind):
    return nf.masked_conv2d if kind == "conv" else nf.masked_linear


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_pruned_neurons_are_exact_zeros_with_zero_gradients(backend, device, kind):
    (x, w, m, b), kwargs = _problem(kind, device, tasks=2, zeros=0.0)
    x, w, m, b = (t.clone() for t in (x, w, m, b))
    m[0, 1] = 0.0
    m[1, 0] = m[1, 3] = 0.0
    w[0, 1] = float("inf")  # a pruned neuron is never computed, so even inf weights stay silent
    w[1, 3] = float("nan")
    for t in (x, w, m, b):
        t.requires_grad_()
    with nf.use_backend(backend):
        out = _fn(kind)(x, w, m, b, **kwargs)
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
def test_task_batched_equals_stacked_single_tasks(backend, device, kind):
    (x, w, m, b), kwargs = _problem(kind, device, tasks=4)
    fn = _fn(kind)
    with nf.use_backend(backend):
        batched = fn(x, w, m, b, **kwargs)
        singles = torch.stack([fn(x[t], w[t], m[t], b[t], **kwargs) for t in range(4)])
    torch.testing.assert_close(batched, singles)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_problem_matches_reference(backend):
    sample = conv_sample(F64, "cuda", tasks=4, batch=40, c_in=64, c_out=64, h=14, w=14, zeros=0.5, seed=5)
    check_against_reference(OPS["masked_conv2d"], backend, "cuda", F64, sample)


# ---- bad input ---------------------------------------------------------------------------


def test_conv_bad_inputs_name_the_argument():
    (x, w, m, b), _ = _problem("conv")
    cases = [
        ((x[0, 0], w, m, b), {}, ValueError, r"input: expected \[N, C_in, H, W\] or unbatched \[C_in, H, W\]"),
        ((x.unsqueeze(0), w, m, b), {}, ValueError, r"a 5-d input is the task-batched form"),
        ((x, w[0], m, b), {}, ValueError, r"weight: expected \[C_out, C_in/groups, kH, kW\]"),
        ((x, w[:, :3], m, b), {}, ValueError, r"input: expected 3 channels \(weight.shape\[-3\] x groups = 3 x 1\), "
                                              r"got 4 channels"),
        ((x, w, m[:4], b), {}, ValueError, r"mask: expected shape \[6\], got \[4\]"),
        ((x, w, m > 0, b), {}, TypeError, "mask: expected a floating-point tensor"),
        ((x, w, m.float(), b), {}, TypeError, "mask: expected dtype torch.float64"),
        ((x, w, m, b[:2]), {}, ValueError, r"bias: expected shape \[6\], got \[2\]"),
        ((x, w.to("meta"), m, b), {}, ValueError, "input: expected device meta"),
        ((x.float(), w, m, b), {}, TypeError, "input: expected dtype torch.float64 \\(the dtype of weight\\)"),
        ((x, w, m, b), {"groups": 4}, ValueError, r"input: expected 16 channels \(weight.shape\[-3\] x groups = 4 x 4\)"),
        ((x, w, m, b), {"groups": 0}, ValueError, "groups: expected a positive int"),
        ((x, w, m, b), {"stride": 0}, ValueError, "stride, dilation: expected stride >= 1"),
        ((x, w, m, b), {"padding": -1}, ValueError, "padding: expected padding >= 0"),
        ((x, w, m, b), {"padding": (1, 2, 3)}, TypeError, "padding: expected an int or a pair of ints"),
        ((x, w, m, b), {"stride": 1.5}, TypeError, "stride: expected an int or a pair of ints, got 1.5"),
        ((x, w, m, b), {"padding": "full"}, ValueError, "padding: expected 'same', 'valid', an int or a pair"),
        ((x, w, m, b), {"padding": "same", "stride": 2}, ValueError, "padding: 'same' is not supported for strided"),
        ((x[..., :1, :1], w, m, b), {}, ValueError, "input: spatial size"),
        ((x.unsqueeze(0), w.unsqueeze(0).expand(2, -1, -1, -1, -1), m, b), {}, ValueError, "weight: expected 1 tasks"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            nf.masked_conv2d(*args, **kwargs)


def test_linear_bad_inputs_name_the_argument():
    (x, w, m, b), _ = _problem("linear")
    cases = [
        ((x, w[0], m, b), ValueError, r"weight: expected \[out, in\]"),
        ((x[:, :3], w, m, b), ValueError, "input: expected 5 features"),
        ((x, w.unsqueeze(0), m.unsqueeze(0), b.unsqueeze(0)), ValueError, r"input: expected \[T=1, \.\.\., in\]"),
        ((x, w, m.int(), b), TypeError, "mask: expected a floating-point tensor"),
        ((x.float(), w, m, b), TypeError, r"input: expected dtype torch.float64 \(the dtype of weight\)"),
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
    (x, w, m, _), _ = _problem("conv", device, torch.float32, batch=2, c_in=3, c_out=4, h=6, w=5, seed=5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.conv2d(x, w, padding=1)
    with nf.use_backend(backend):
        out = nf.masked_conv2d(x, w, m, padding=1)
    assert out.stride() == want.stride()
    torch.testing.assert_close(out, masked_conv2d_reference(x, w, m, padding=1), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not nf.backends.status("cpu").devices, reason="C++ CPU extension not built")
@pytest.mark.parametrize("tasks", [None, 1])
def test_cpu_single_output_channel_backward(tasks):
    # Found by the oracle's random shapes: [N, 1, H, W] is both contiguous and channels-last, and the
    # upstream gradient torch.randn(out.shape) is contiguous where the output's strides are
    # channels-last; the backward takes both (strides of size-1 dimensions do not count).
    (x, w, m, b), kwargs = _problem("conv", tasks=tasks, batch=1, c_in=1, c_out=1, h=1, w=1, k=(1, 1),
                                    padding=(0, 1), bias=False, skip_zero=False)
    x, w, m = (t.requires_grad_() for t in (x, w, m))  # the mask's gradient takes the path that fails
    with nf.use_backend("cpu"):
        out = nf.masked_conv2d(x, w, m, **kwargs)
        got = torch.autograd.grad(out, (x, w, m), torch.ones(out.shape, dtype=out.dtype))
    want = torch.autograd.grad(masked_conv2d_reference(x, w, m, **kwargs), (x, w, m),
                               torch.ones(out.shape, dtype=out.dtype))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


# ---- the GPU backends: the active neurons found in the kernels, the split weight gradient ---------

GPU_BACKENDS = [p for p in BACKENDS if p.values[0] in ("triton", "cuda")]


def _active_patterns(channels):
    """Masks over many channels that stress the kernels' search for the active ones: every density,
    the actives in runs at either end, and one active channel past the first windows."""
    gen = torch.Generator().manual_seed(11)
    alternate = torch.arange(channels) % 2 == 0
    late = torch.zeros(channels, dtype=torch.bool)
    late[-1] = True
    return {
        "all": torch.ones(channels, dtype=torch.bool), "none": torch.zeros(channels, dtype=torch.bool),
        "random-10%": torch.rand(channels, generator=gen) < 0.1,
        "random-70%": torch.rand(channels, generator=gen) < 0.7,
        "alternate": alternate, "last-only": late, "last-third": torch.arange(channels) >= 2 * channels // 3,
    }


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("pattern", list(_active_patterns(4)))
def test_gpu_kernels_find_the_active_neurons_among_many(backend, device, pattern):
    # 300 outputs: several of the windows a kernel program searches its active neurons in (64 on
    # Triton, 256 on CUDA) and several blocks of slots; two tasks with different patterns.
    out_features = 300
    keep = torch.stack([_active_patterns(out_features)[pattern], _active_patterns(out_features)["random-70%"]])
    sample = linear_sample(F64, device, tasks=2, lead=(3,), d_in=5, d_out=out_features, seed=7)
    sample.tensors["mask"] = sample.tensors["mask"] * keep.to(F64)
    check_against_reference(OPS["masked_linear"], backend, device, F64, sample)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("skip_zero", [True, False])
def test_gpu_grouped_conv_finds_the_active_neurons_of_each_group(backend, device, skip_zero):
    sample = conv_sample(F64, device, tasks=2, batch=2, c_in=4, c_out=140, h=4, w=3, groups=2, zeros=0.6,
                         skip_zero=skip_zero, seed=9)
    check_against_reference(OPS["masked_conv2d"], backend, device, F64, sample)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("need", ["weight", "no-weight"])
def test_gpu_weight_gradient_split_over_pixels_is_summed_once(backend, device, need, monkeypatch):
    # Large problems split the weight gradient's pixels over programs and add the partial sums in a
    # second launch; forced here on a small one (a split every 16 pixels).
    from neuronml_fast.ops.masked import gpu

    splits = []
    original = gpu.weight_grad_splits

    def small_splits(pixels, block):
        split = original(pixels, block, pixels_per_program=16)
        splits.append(split[0])
        return split

    monkeypatch.setattr(gpu, "weight_grad_splits", small_splits)
    sample = conv_sample(F64, device, tasks=2, batch=3, c_in=3, c_out=5, h=5, w=4, zeros=0.4, seed=4)
    wanted = ("input", "weight", "mask", "bias") if need == "weight" else ("input", "mask", "bias")
    check_against_reference(OPS["masked_conv2d"], backend, device, F64, sample, wanted=wanted)
    assert splits and min(splits) > 1


# ---- float32 GEMMs: TF32 where torch's switches allow it, IEEE otherwise -------------------------

from neuronml_fast import _precision  # noqa: E402
from neuronml_fast.ops.masked import gpu as masked_gpu  # noqa: E402
from oracle import F32, assert_close, gradients, leaves  # noqa: E402

# torch's TF32 tests compare at 5e-3 (tf32_on_and_off(0.005)); the oracle scales atol by the
# largest reference value.
TF32_TOL = (5e-3, 5e-3)
IEEE_TOL = (1e-5, 1e-5)


def _new_api():
    return hasattr(torch.backends.cudnn, "conv")


@pytest.fixture
def restore_fp32_switches():
    """Every fp32-precision switch of torch as it was (the new API's raw values and the legacy ones)."""
    if _new_api():
        getter, setter = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
        keys = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul")]
        # The getters resolve "none" to the fallback's value: save what resolves to the same.
        saved = torch.get_float32_matmul_precision(), [(k, getter(*k)) for k in keys]
        yield
        torch.set_float32_matmul_precision(saved[0])
        for (backend, op), value in saved[1]:
            setter(backend, op, value)
    else:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        yield
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _set_legacy(conv, matmul):
    torch.backends.cudnn.allow_tf32 = conv
    torch.backends.cuda.matmul.allow_tf32 = matmul


def _set_new(conv, matmul):
    torch.backends.cudnn.conv.fp32_precision = conv
    torch.backends.cuda.matmul.fp32_precision = matmul


# (how the switches are set, whether an fp32 conv may use TF32, whether an fp32 matmul may)
SWITCHES = [
    ("legacy: cudnn on, matmul off", lambda: _set_legacy(True, False), True, False),
    ("legacy: cudnn off, matmul on", lambda: _set_legacy(False, True), False, True),
    ("legacy: cudnn on, set_float32_matmul_precision('high')",
     lambda: (_set_legacy(True, False), torch.set_float32_matmul_precision("high")), True, True),
    ("new: conv ieee, matmul tf32", lambda: _set_new("ieee", "tf32"), False, True),
    # "none" falls back to the CUDA backend's setting (torch.backends.cudnn.fp32_precision, which is
    # the matmul's fallback too), then to torch.backends.fp32_precision
    ("new: conv none, cudnn tf32", lambda: (_set_new("none", "none"),
                                            setattr(torch.backends.cudnn, "fp32_precision", "tf32")), True, True),
    ("new: conv none, cudnn tf32, matmul ieee", lambda: (_set_new("none", "ieee"),
                                                         setattr(torch.backends.cudnn, "fp32_precision", "tf32")),
     True, False),
    ("new: generic tf32", lambda: (_set_new("none", "none"), setattr(torch.backends, "fp32_precision", "tf32")),
     True, True),
    ("new: generic tf32, conv ieee", lambda: (setattr(torch.backends, "fp32_precision", "tf32"),
                                              _set_new("ieee", "none")), False, True),
]


@pytest.mark.parametrize("how,conv,matmul", [(s[0], s[2], s[3]) for s in SWITCHES], ids=[s[0] for s in SWITCHES])
def test_gemm_precision_follows_torch_switches(how, conv, matmul, restore_fp32_switches):
    setting = dict((s[0], s[1]) for s in SWITCHES)[how]
    if how.startswith("new") and not _new_api():
        pytest.skip("torch < 2.9 has no fp32_precision switches")
    setting()
    if _new_api():  # what torch's own CUDA conv and matmul read (Context::allowTF32CuDNN / allowTF32CuBLAS)
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32", torch.backends.cuda.matmul.fp32_precision == "tf32") \
            == (conv, matmul)
    assert masked_gpu.dot_precision(torch.float32, "conv") == ("tf32" if conv else "ieee")
    assert masked_gpu.dot_precision(torch.float32, "matmul") == ("tf32" if matmul else "ieee")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert masked_gpu.dot_precision(dtype, "conv") == masked_gpu.dot_precision(dtype, "matmul") == "ieee"


def test_fp32_precision_context_restores_the_switches(restore_fp32_switches):
    with _precision.fp32_precision(True, False):
        assert (_precision.tf32_allowed("conv"), _precision.tf32_allowed("matmul")) == (True, False)
        with _precision.full_float32():
            assert not _precision.tf32_allowed("conv") and not _precision.tf32_allowed("matmul")
            # torch's legacy getter (torch.export and cudnn.flags read it) raises while cuDNN's
            # conv and RNN switches differ: the block keeps them together
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is True
        assert (_precision.tf32_allowed("conv"), _precision.tf32_allowed("matmul")) == (True, False)
    with pytest.raises(ValueError, match="op: expected one of"):
        _precision.tf32_allowed("rnn")
    if _new_api():
        # Switches set through the new API only: torch's legacy getters raise on this mix (the
        # self-check's float32 block read them), the new ones resolve it.
        torch.backends.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "none"
        with pytest.raises(RuntimeError):
            torch.backends.cuda.matmul.allow_tf32
        assert _precision.tf32_allowed("matmul")
        with _precision.full_float32():
            assert not _precision.tf32_allowed("conv") and not _precision.tf32_allowed("matmul")
        assert _precision.tf32_allowed("matmul")


class _PrecisionSpy:
    """What precision reached each GEMM kernel launch of a GPU backend: the Triton kernels'
    DOT_PRECISION, the CUDA extension's tf32 argument."""

    TRITON = {"_conv_forward_kernel", "_conv_input_grad_kernel", "_conv_weight_grad_kernel"}
    CUDA = {"masked_conv_forward_out": 9, "masked_conv_input_grad_out": 10, "masked_conv_weight_grad_out": 11}

    def __init__(self, backend, monkeypatch):
        self.seen = []
        if backend == "triton":
            from neuronml_fast.ops import _triton_launch

            def handler(kernel, grid, args, kwargs):
                if kernel.__name__ in self.TRITON:
                    self.seen.append(kwargs["DOT_PRECISION"])
                with _triton_launch.intercepted(None):
                    _triton_launch.launch(kernel, grid, *args, **kwargs)

            self.context = _triton_launch.intercepted(handler)
        else:
            from neuronml_fast import _extensions

            ext = _extensions.cuda()
            for name, position in self.CUDA.items():
                def spy(*args, _original=getattr(ext, name), _position=position):
                    self.seen.append("tf32" if args[_position] else "ieee")
                    return _original(*args)

                monkeypatch.setattr(ext, name, spy)
            self.context = contextlib.nullcontext()


def _tf32(t):
    """t with its float32 values rounded to TF32 as cvt.rna.tf32.f32 rounds (10 mantissa bits,
    ties away from zero)."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).to(t.dtype)


def _run(kind, backend, device, sample, wanted):
    args = leaves(sample, wanted)
    with nf.use_backend(backend):
        out = _fn(kind)(**args, **sample.options)
        return out, dict(zip(wanted, gradients(out, args, wanted)))


def _reference(kind, sample, wanted, round_operands=False):
    args = leaves(sample, wanted, dtype=torch.float64)
    if round_operands:  # what the tensor cores multiply under TF32: the operands rounded
        args = {k: v if v is None or k not in ("input", "weight") else _tf32(v.detach().float()).double()
                .requires_grad_(k in wanted) for k, v in args.items()}
    reference = masked_conv2d_reference if kind == "conv" else masked_linear_reference
    out = reference(**args, **sample.options)
    return out, dict(zip(wanted, gradients(out, args, wanted)))


def _float32_sample(kind, device):
    if kind == "conv":
        return conv_sample(F32, device, tasks=2, batch=2, c_in=6, c_out=5, h=5, w=6, zeros=0.4, seed=12)
    return linear_sample(F32, device, tasks=2, lead=(7,), d_in=24, d_out=5, zeros=0.4, seed=12)


GEMM_WANTED = ("input", "weight", "mask", "bias")


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_float32_gemms_follow_the_switch_of_their_layer(backend, device, kind, tf32, monkeypatch):
    # A conv follows the cuDNN switch, a linear layer (the same kernels, as a 1x1 conv) the matmul
    # one: the other switch is set the other way, and every GEMM launch (forward, input and
    # weight gradients) must get its layer's. TF32 tolerances as torch's own TF32 tests.
    spy = _PrecisionSpy(backend, monkeypatch)
    layer_tf32 = {"conv": (tf32, not tf32), "linear": (not tf32, tf32)}[kind]
    sample = _float32_sample(kind, device)
    with _precision.fp32_precision(*layer_tf32), spy.context:
        out, grads = _run(kind, backend, device, sample, GEMM_WANTED)
    assert spy.seen == ["tf32" if tf32 else "ieee"] * 3
    want, want_grads = _reference(kind, sample, GEMM_WANTED)
    tol = TF32_TOL if tf32 else IEEE_TOL
    assert_close(out, want, op=f"masked_{kind}", backend=backend, dtype=F32, what="output", tol=tol)
    assert_close(grads, want_grads, op=f"masked_{kind}", backend=backend, dtype=F32, what="grad", tol=tol)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.skipif(not nf.backends.status("cuda").devices, reason="CUDA backend not available here")
def test_cuda_tf32_rounds_the_operands_of_every_gemm(kind):
    # On the tensor cores (and in the emulation, which rounds as cvt.rna.tf32.f32 does) TF32
    # multiplies the operands rounded to 10 mantissa bits, products added in float32: the result
    # matches a float64 reference on the rounded operands to float32 accumulation, and is measurably
    # off the exact one. (The Triton interpreter's tl.dot computes in float32 whatever its
    # input_precision, so this holds on compiled Triton only; the test above covers it here.)
    device = sorted(nf.backends.status("cuda").devices)[0]
    sample = _float32_sample(kind, device)
    wanted = ("input", "weight") if kind == "conv" else ("weight",)
    with _precision.fp32_precision(True, True):
        out, grads = _run(kind, "cuda", device, sample, wanted)
    rounded, rounded_grads = _reference(kind, sample, wanted, round_operands=True)
    exact, _ = _reference(kind, sample, wanted)
    assert_close(out, rounded, op=f"masked_{kind}", backend="cuda", dtype=F32, what="output", tol=IEEE_TOL)
    assert (out.double() - exact).abs().max() > 1e-4 * exact.abs().max()
    # The input gradient's operands are gy (rounded) and the weight; the weight gradient's gy and x.
    # gy itself is float32 before rounding: compare at TF32 resolution, yet well inside TF32_TOL.
    for name in wanted:
        assert_close(grads[name], rounded_grads[name], op=f"masked_{kind}", backend="cuda", dtype=F32,
                     what=f"grad {name}", tol=(2e-3, 2e-3))


@pytest.mark.skipif(not nf.backends.status("cuda").devices, reason="CUDA backend not available here")
def test_cuda_kernels_refuse_a_task_over_32_bit_indexing():
    from neuronml_fast.ops.masked import cuda as masked_cuda

    limit = masked_cuda._extensions.cuda().MASKED_MAX_INDEX
    geo = masked_gpu.ConvGeometry(T=1, N=2**16, CIN=64, H=32, W=32, COUT=8, CIN_G=64, KH=3, KW=3, HO=32, WO=32, G=1,
                                  stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    assert geo.N * geo.CIN * geo.H * geo.W > limit
    with pytest.raises(ValueError, match="input of 4294967296 elements per task, over the .* 32 bits"):
        masked_cuda.CudaConvKernels.check(geo)
    masked_cuda.CudaConvKernels.check(dataclasses.replace(geo, N=2**10))
