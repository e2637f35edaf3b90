"""nf.masked_conv2d / nf.masked_linear (SPEC section 2): what is particular to the masked layers.

Against the reference on every backend and dtype, random shapes, every subset of requires_grad,
gradcheck, second order, opcheck, vmap, torch.compile, non-contiguous, channels-last and empty
inputs: tests/test_oracle.py, over the rows masked_conv2d and masked_linear of tests/oracle.py.
"""

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast.ops.masked import masked_conv2d_reference

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
