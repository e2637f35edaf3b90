"""The masked layers as drop-ins for torch.nn: memory formats as torch decides them, every argument and
input form of nn.Conv2d / nn.Linear (outputs, gradients and errors), and autocast."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronml_fast as nf
from neuronml_fast.ops import _autocast
from neuronml_fast.ops.masked import masked_conv2d_op, masked_linear_op

from conftest import emulated_gpu, kernel_backends

CL = torch.channels_last
F64 = torch.float64
BACKENDS = [pytest.param("reference", "cpu", id="reference")] + kernel_backends()

# ---- memory format: ours = torch's ------------------------------------------------------------
# Shape classes (N, C_in, H, W, C_out, kernel), the ambiguous ones included: one input channel
# (contiguous and channels_last at once), 1 x 1 images, one image, one output channel.
SHAPES = {
    "generic": (2, 3, 5, 5, 4, 3),
    "C_in=1": (2, 1, 5, 5, 4, 3),
    "H=W=1": (2, 3, 1, 1, 4, 1),
    "N=1": (1, 3, 5, 5, 4, 3),
    "C_out=1": (2, 3, 5, 5, 1, 3),
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": CL, "NHWC storage": "nhwc"}


def _laid_out(t, layout):
    """``t`` in a layout: torch's two memory formats (``contiguous(memory_format=...)`` keeps the
    strides of a tensor that already is in the format, such as one with one channel), or NHWC
    storage whatever the shape (the strides a permuted NHWC tensor has)."""
    if layout == "nhwc":
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return t.contiguous(memory_format=layout)


def _layout_problem(shape, input_layout, weight_layout, dtype=F64):
    n, c, h, w, o, k = shape
    g = torch.Generator().manual_seed(0)
    x = _laid_out(torch.randn(n, c, h, w, dtype=dtype, generator=g), LAYOUTS[input_layout])
    weight = _laid_out(torch.randn(o, c, k, k, dtype=dtype, generator=g), LAYOUTS[weight_layout])
    mask = (torch.arange(o) % 3 != 1).to(dtype)
    return x.requires_grad_(), weight, mask, k // 2


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_output_and_input_gradient_strides_equal_torch_conv2d(backend, device):
    mismatches = []
    for (name, shape), input_layout, weight_layout in itertools.product(SHAPES.items(), LAYOUTS, LAYOUTS):
        x, weight, mask, padding = _layout_problem(shape, input_layout, weight_layout)
        ref = F.conv2d(x, weight, padding=padding)
        (ref_grad,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
        with nf.use_backend(backend):
            out = nf.masked_conv2d(x, weight, mask, padding=padding)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        if out.stride() != ref.stride() or grad.stride() != ref_grad.stride():
            mismatches.append(f"{name} input {input_layout} weight {weight_layout}: output {out.stride()} vs "
                              f"{ref.stride()}, input grad {grad.stride()} vs {ref_grad.stride()}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("reference", "cpu")])
def test_a_one_channel_first_layer_flattens_with_view(backend, device):
    """Every MNIST/Omniglot model: [N, 1, H, W] in, x.view(x.size(0), -1) after the conv."""
    conv = nf.nn.MaskedConv2d(1, 8, 3, padding=1)
    with nf.use_backend(backend):
        out = conv(torch.randn(4, 1, 28, 28))
    assert out.is_contiguous()
    assert out.view(out.size(0), -1).shape == (4, 8 * 28 * 28)


def test_float32_strides_follow_torch_on_the_cpu_backend():
    for input_layout, weight_layout in itertools.product(LAYOUTS, LAYOUTS):
        x, weight, mask, padding = _layout_problem(SHAPES["C_in=1"], input_layout, weight_layout, torch.float32)
        with nf.use_backend("cpu"):
            out = nf.masked_conv2d(x, weight, mask, padding=padding)
        assert out.stride() == F.conv2d(x, weight, padding=padding).stride(), (input_layout, weight_layout)


# ---- every form of nn.Conv2d / nn.Linear ------------------------------------------------------

CONV_FORMS = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=(2, 3), padding=(1, 0), dilation=(2, 1)),
    dict(kernel_size=3, stride=(2,), padding=(1,)),  # one-element sequences, as torch takes them
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="same"),  # even kernel: one more zero after the input
    dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=4, padding="same", dilation=3),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=1, bias=False),
] + [dict(kernel_size=k, padding=p, padding_mode=mode)
     for mode in ("reflect", "replicate", "circular") for k, p in ((3, 1), (3, (1, 2)), (4, "same"), (3, "valid"))]


def _twins(plain, masked_type, **kwargs):
    masked = masked_type(**kwargs)
    masked.load_state_dict(plain.state_dict())
    return masked


@pytest.mark.parametrize("form", CONV_FORMS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_masked_conv2d_takes_every_form_of_nn_conv2d(form, backend):
    if backend not in nf.backends.available():
        pytest.skip(f"{backend} backend not built")
    torch.manual_seed(0)
    kwargs = dict(in_channels=4, out_channels=6, **form, device="cpu", dtype=F64)
    plain = nn.Conv2d(**kwargs)
    masked = _twins(plain, nf.nn.MaskedConv2d, **kwargs)
    for shape in ((3, 4, 7, 8), (4, 7, 8)):  # batched and unbatched
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        with nf.use_backend(backend):
            out = masked(x)
        ref = plain(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        ours = torch.autograd.grad(out, (x, masked.weight) + ((masked.bias,) if masked.bias is not None else ()), g)
        theirs = torch.autograd.grad(ref, (x, plain.weight) + ((plain.bias,) if plain.bias is not None else ()), g)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_masked_conv2d_constructor_takes_device_and_dtype_as_nn_conv2d():
    layer = nf.nn.MaskedConv2d(2, 3, 3, device="meta", dtype=torch.float16)
    plain = nn.Conv2d(2, 3, 3, device="meta", dtype=torch.float16)
    for name, tensor in plain.state_dict().items():
        assert layer.state_dict()[name].device == tensor.device and layer.state_dict()[name].dtype == tensor.dtype
    assert layer.mask.dtype == torch.float16 and layer.mask.device.type == "meta"


@pytest.mark.parametrize("kwargs", [dict(padding="same", stride=2), dict(padding="full"), dict(padding_mode="wrap")],
                         ids=str)
def test_masked_conv2d_constructor_errors_are_nn_conv2ds(kwargs):
    with pytest.raises(ValueError) as theirs:
        nn.Conv2d(2, 3, 3, **kwargs)
    with pytest.raises(ValueError) as ours:
        nf.nn.MaskedConv2d(2, 3, 3, **kwargs)
    assert str(ours.value) == str(theirs.value)


def _conv_error_cases():
    x = torch.randn(2, 4, 6, 6)
    return {
        "wrong channel count": (x[:, :3], "input: expected 4 channels"),
        "2-d input": (x[0, 0], "input: expected"),
        "5-d input to a 4-d layer": (x.unsqueeze(0), "a 5-d input is the task-batched form"),
        "other dtype": (x.double(), "input: expected dtype torch.float32"),
        "image smaller than the kernel": (x[..., :2, :2], "input: spatial size"),
    }


@pytest.mark.parametrize("case", list(_conv_error_cases()))
def test_masked_conv2d_raises_where_nn_conv2d_raises(case):
    x, message = _conv_error_cases()[case]
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3)
    masked = _twins(plain, nf.nn.MaskedConv2d, in_channels=4, out_channels=6, kernel_size=3)
    with pytest.raises(RuntimeError):
        plain(x)
    with pytest.raises(RuntimeError, match=message):  # the type torch raises, and a ValueError/TypeError
        masked(x)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5), (2, 1, 3, 5), (0, 5)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_masked_linear_takes_every_input_form_of_nn_linear(shape, bias, backend):
    if backend not in nf.backends.available():
        pytest.skip(f"{backend} backend not built")
    torch.manual_seed(0)
    kwargs = dict(in_features=5, out_features=4, bias=bias, device="cpu", dtype=F64)
    plain = nn.Linear(**kwargs)
    masked = _twins(plain, nf.nn.MaskedLinear, **kwargs)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    with nf.use_backend(backend):
        out = masked(x)
    ref = plain(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = lambda m: (m.weight,) + ((m.bias,) if bias else ())  # noqa: E731
    for a, b in zip(torch.autograd.grad(out, (x, *params(masked)), g), torch.autograd.grad(ref, (x, *params(plain)), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x", [torch.randn(3, 4), torch.randn(3, 5).double(), torch.randn(())],
                         ids=["wrong features", "other dtype", "0-d"])
def test_masked_linear_raises_where_nn_linear_raises(x):
    plain = nn.Linear(5, 2)
    masked = _twins(plain, nf.nn.MaskedLinear, in_features=5, out_features=2)
    with pytest.raises(RuntimeError):
        plain(x)
    with pytest.raises(RuntimeError, match="input: expected"):
        masked(x)


# ---- autocast -------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_cpu_bfloat16_autocast_computes_as_torch_does(backend):
    torch.manual_seed(0)
    plain = _Net()
    ours = nf.nn.convert(_Net())
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 6, 6)
    with nf.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
        ref = plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    for p in ours.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32  # parameter gradients stay float32


def test_a_custom_op_called_directly_under_autocast_returns_the_autocast_dtype():
    x, w, m = torch.randn(1, 2, 3, 6, 6), torch.randn(1, 4, 3, 3, 3), torch.ones(1, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, pre = masked_conv2d_op(x, w, m, None, [1, 1], [1, 1], [1, 1], 1, True, True, True, "cpu")
    assert out.dtype == pre.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.conv2d(x[0], w[0], padding=1).unsqueeze(0), rtol=0.02, atol=0.05)


def test_float64_is_left_alone_under_autocast():
    x, w, m = torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(4, 3, 3, 3, dtype=F64), torch.ones(4, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nf.masked_conv2d(x, w, m)
    assert out.dtype == F64


def test_every_custom_op_has_cpu_and_cuda_autocast_kernels():
    for name in ("masked_conv2d", "masked_conv2d_backward", "masked_linear", "masked_linear_backward",
                 "neuron_sensitivity", "batch_norm_rows_double_backward", "plastic", "plastic_backward"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"neuronml_fast::{name}", key), (name, key)


GPU_BACKENDS = [p for p in kernel_backends() if p.values[0] in ("triton", "cuda")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_cuda_autocast_policy_on_the_gpu_backends(backend, device, dtype):
    """CUDA autocast's casts are device-independent: the kernel the AutocastCUDA key runs, given the
    autocast dtype, on the GPU backends running on CPU tensors here."""
    if emulated_gpu(backend, device) and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 tl.dot")
    torch.manual_seed(0)
    x, w, m, b = torch.randn(1, 2, 3, 5, 5), torch.randn(1, 4, 3, 3, 3), torch.ones(1, 4), torch.randn(1, 4)
    policy = _autocast.Policy(_autocast.LOWER, cast_outputs=(0, 1))
    out, pre = _autocast.run(masked_conv2d_op, "masked_conv2d", policy, dtype,
                             (x, w, m, b, [1, 1], [1, 1], [1, 1], 1, True, True, True, backend))
    assert out.dtype == pre.dtype == dtype  # the backend has 16-bit kernels: computed in the autocast dtype
    ref = nf.ops.masked.masked_conv2d_reference(x[0].to(dtype).double(), w[0].to(dtype).double(), m[0].double(),
                                                 b[0].to(dtype).double(), padding=1)
    torch.testing.assert_close(out[0].double(), ref, rtol=0.02, atol=0.05)
    x2, w2, m2 = torch.randn(1, 3, 5), torch.randn(1, 4, 5), torch.ones(1, 4)
    out, _ = _autocast.run(masked_linear_op, "masked_linear", policy, dtype, (x2, w2, m2, None, True, backend))
    assert out.dtype == dtype


def test_where_a_backend_lacks_the_autocast_dtype_it_computes_in_float32():
    """The CPU backend has no bfloat16 kernels: float32 compute, the autocast dtype out."""
    x, w, m = torch.randn(1, 2, 3, 5, 5), torch.randn(1, 4, 3, 3, 3), torch.ones(1, 4)
    policy = _autocast.Policy(_autocast.LOWER, cast_outputs=(0, 1))
    out, _ = _autocast.run(masked_conv2d_op, "masked_conv2d", policy, torch.bfloat16,
                           (x, w, m, None, [1, 1], [1, 1], [1, 1], 1, True, True, True, "cpu"))
    assert out.dtype == torch.bfloat16
    exact = F.conv2d(x[0], w[0], padding=1).unsqueeze(0).to(torch.bfloat16)
    assert torch.equal(out, exact) or (out.float() - exact.float()).abs().max() <= 2 ** -7 * exact.abs().max()


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize("layer", ["rnn", "linear", "backpropamine"])
def test_plastic_layers_under_cpu_autocast_compute_as_the_rnn_cells(backend, layer):
    torch.manual_seed(0)
    net = {"rnn": lambda: nf.nn.PlasticRNN(6), "linear": lambda: nf.nn.PlasticLinear(6, 4),
           "backpropamine": lambda: nf.nn.PlasticRNN(6, clip=1.0, modulator="neuron")}[layer]()
    x = torch.randn(5, 2, 6)
    with nf.use_backend("reference"):
        ref, _ = net(x)
    with nf.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = net(x)
        hebb = state[1] if isinstance(state, tuple) else state
        out2, _ = net(x, state) if layer != "linear" else net(x, hebb=hebb)  # the returned state carries
    assert out.dtype == out2.dtype == torch.bfloat16 and hebb.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out2.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)


def test_sensitivity_and_batch_norm_rows_under_autocast():
    w, g = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = nf.neuron_sensitivity(w.bfloat16(), g)  # mixed dtypes are taken, as sum would take them
        x = torch.randn(16, 4).bfloat16().requires_grad_()
        y = nf.batch_norm_rows(x, torch.ones(4, requires_grad=True), torch.zeros(4))
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, nf.neuron_sensitivity(w.bfloat16().float(), g))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.batch_norm(x.float(), None, None, training=True), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_cuda_autocast_plastic_on_the_gpu_backends_computes_in_the_autocast_dtype(backend, device):
    # As torch's RNN cells under autocast: the inputs and the output in float16, the trace and the
    # accumulation in float32 (the 16-bit kernels keep them so).
    from neuronml_fast.ops.plastic.op import plastic_op

    torch.manual_seed(0)
    x, w, a = torch.randn(4, 2, 5), torch.randn(5, 5) * 0.3, torch.randn(5, 5) * 0.3
    args = (x, w, a, torch.tensor(0.1), None, None, None, None, None, None, True, "hebb", "tanh", 2, None, None,
            None, True, backend)
    policy = _autocast.Policy(_autocast.LOWER, state_inputs=(4,), cast_outputs=(0,))
    computed, wanted = _autocast.compute_dtype("plastic", backend, _autocast.LOWER, torch.float16, torch.float32)
    output, hebb, *_ = _autocast.run(plastic_op, "plastic", policy, torch.float16, args)
    assert output.dtype == wanted == computed == torch.float16 and hebb.dtype == torch.float32
    half = [t.half().double() for t in (x, w, a, torch.tensor(0.1))]
    ref, ref_hebb = nf.ops.plastic.plastic_rnn_reference(*half)
    torch.testing.assert_close(output.double(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(hebb.double(), ref_hebb, rtol=1e-5, atol=1e-6)  # accumulated in float32
