"""Layers: MaskedConv2d, MaskedLinear, MaskedBatchNorm2d, NeuronGate, convert."""

import copy

import pytest
import torch
from torch import nn

import neuronml_fast as nf

CONV_VARIANTS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, dilation=(1, 2), bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, padding=(2, 1)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("kwargs", CONV_VARIANTS)
def test_masked_conv2d_is_a_drop_in_for_conv2d(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    masked = nf.nn.MaskedConv2d(**kwargs).double()
    assert set(masked.state_dict()) == set(conv.state_dict()) | {"mask"}
    masked.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(masked(x), conv(x))


def test_masked_linear_is_a_drop_in_for_linear():
    torch.manual_seed(0)
    linear = nn.Linear(5, 7).double()
    masked = nf.nn.MaskedLinear(5, 7).double()
    masked.load_state_dict(linear.state_dict(), strict=True)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(masked(x), linear(x))


def test_masked_state_dict_round_trips_the_mask():
    layer = nf.nn.MaskedLinear(4, 3)
    layer.mask.copy_(torch.tensor([1.0, 0.0, 0.5]))
    other = nf.nn.MaskedLinear(4, 3)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.mask, layer.mask)


def test_mask_sources_argument_then_gate_then_buffer():
    torch.manual_seed(0)
    layer = nf.nn.MaskedLinear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    layer.mask.copy_(torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(layer(x)[:, 1], torch.zeros(5, dtype=torch.float64))
    layer.gate = nf.nn.NeuronGate(3, mode="topk", k=1).double()
    with torch.no_grad():
        layer.gate.logits.copy_(torch.tensor([-1.0, 5.0, 0.0]))
    out = layer(x)
    assert (out[:, 0] == 0).all() and (out[:, 2] == 0).all() and (out[:, 1] != 0).any()
    explicit = layer(x, mask=torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(explicit[:, 2], 2 * nn.functional.linear(x, layer.weight, layer.bias)[:, 2])


@pytest.mark.parametrize("layer_kind", ["conv", "linear"])
def test_track_sensitivity_equals_taylor_importance(layer_kind):
    torch.manual_seed(0)
    if layer_kind == "conv":
        layer = nf.nn.MaskedConv2d(3, 5, 3, padding=1, track_sensitivity=True).double()
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    else:
        layer = nf.nn.MaskedLinear(6, 5, track_sensitivity=True).double()
        x = torch.randn(4, 6, dtype=torch.float64)
    layer.mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))
    layer(x).tanh().sum().backward()
    expected = nf.neuron_sensitivity(layer.weight, layer.weight.grad, layer.bias, layer.bias.grad)
    assert layer.sensitivity.dtype == torch.float64  # the accumulation dtype of a float64 layer
    torch.testing.assert_close(layer.sensitivity, expected)
    assert layer.sensitivity[1] == 0  # pruned
    layer(x).tanh().sum().backward()  # a second backward adds into the buffer
    torch.testing.assert_close(layer.sensitivity, 2 * expected)
    layer.reset_sensitivity()
    assert torch.equal(layer.sensitivity, torch.zeros(5, dtype=torch.float64))
    assert layer.half().sensitivity.dtype == torch.float32


def test_neuron_gate_modes():
    gate = nf.nn.NeuronGate(6, mode="soft", temperature=2.0)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-4.0, -1.0, 0.5, 2.0, 3.0, -0.5]))
    soft = gate()
    assert ((soft > 0) & (soft < 1)).all()
    gate.eval()
    assert torch.equal(gate(), (soft > 0.5).float())

    hard = nf.nn.NeuronGate(6, mode="hard")
    with torch.no_grad():
        hard.logits.copy_(gate.logits)
    mask = hard()
    assert set(mask.tolist()) <= {0.0, 1.0}
    mask.sum().backward()  # straight-through: the sigmoid's gradient
    torch.testing.assert_close(hard.logits.grad, torch.sigmoid(hard.logits) * (1 - torch.sigmoid(hard.logits)))

    topk = nf.nn.NeuronGate(6, mode="topk", k=2)
    with torch.no_grad():
        topk.logits.copy_(gate.logits)
    assert torch.equal(topk(), torch.tensor([0.0, 0, 0, 1, 1, 0]))
    assert topk.active_fraction() == pytest.approx(2 / 6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="sparse"), "mode: expected one of"),
    (dict(temperature=0.0), "temperature: expected a positive number"),
    (dict(threshold=1.5), r"threshold: expected a number in \(0, 1\)"),
    (dict(mode="topk"), "k: expected an int"),
])
def test_neuron_gate_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nf.nn.NeuronGate(4, **kwargs)


def test_hard_gate_at_eval_skips_pruned_neurons_exactly():
    layer = nf.nn.MaskedConv2d(2, 4, 3, gate=nf.nn.NeuronGate(4, mode="soft")).eval()
    with torch.no_grad():
        layer.gate.logits.copy_(torch.tensor([3.0, -3.0, 3.0, -3.0]))
    out = layer(torch.randn(1, 2, 5, 5))
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1])) and torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))


def test_convert_swaps_in_place_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))
    params = list(model.parameters())
    x = torch.randn(2, 1, 6, 6)
    before = model(x)
    converted = nf.nn.convert(model, gate=True)
    assert converted is model
    assert isinstance(model[0], nf.nn.MaskedConv2d) and isinstance(model[2][1], nf.nn.MaskedLinear)
    assert all(a is b for a, b in zip(params, [model[0].weight, model[0].bias, model[2][1].weight, model[2][1].bias]))
    for layer in (model[0], model[2][1]):
        layer.gate.eval()  # soft gate, hardened at eval: all neurons on at init
    torch.testing.assert_close(model(x), before)
    assert isinstance(nf.nn.convert(nn.Linear(2, 2)), nf.nn.MaskedLinear)


def test_masked_batchnorm_keeps_pruned_neurons_silent():
    torch.manual_seed(0)
    conv = nf.nn.MaskedConv2d(3, 4, 3, padding=1).double()
    bn = nf.nn.MaskedBatchNorm2d(4).double()
    mask = torch.tensor([1.0, 0.0, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    running = bn.running_mean.clone(), bn.running_var.clone()
    out = torch.relu(bn(conv(x, mask), mask))
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert bn.running_mean[1] == running[0][1] and bn.running_var[1] == running[1][1]
    assert bn.running_mean[0] != running[0][0]
    out.square().sum().backward()
    assert conv.weight.grad[1].abs().sum() == 0 and bn.weight.grad[1] == 0 and bn.bias.grad[1] == 0
    assert mask.grad[1] == 0 and mask.grad[2] != 0
    plain = nn.BatchNorm2d(4).double()
    torch.testing.assert_close(bn(conv(x, torch.ones(4, dtype=torch.float64)), None), plain(conv(x)))


def _conv_bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
                          nn.BatchNorm1d(3))
    with torch.no_grad():  # a trained model's batch norms: nonzero shifts and running statistics
        for bn in (model[1], model[4], model[8]):
            bn.bias.uniform_(0.5, 1.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _outputs_by_mode(model, x):
    """(train-mode output, eval-mode output); the train-mode call updates running statistics."""
    model.train()
    train = model(x)
    model.eval()
    return train, model(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_keeps_a_pruned_channel_exactly_zero_after_batch_norm(mode):
    original = _conv_bn_model()
    model = nf.nn.convert(copy.deepcopy(original))
    assert isinstance(model[1], nf.nn.MaskedBatchNorm2d) and model[1].mask_source is model[0]
    assert isinstance(model[8], nf.nn.MaskedBatchNorm1d) and model[8].mask_source is model[7]
    assert set(model.state_dict()) == set(original.state_dict()) | {"0.mask", "3.mask", "7.mask"}
    duplicate = copy.deepcopy(model)
    assert duplicate[1].mask_source is duplicate[0]
    model[0].mask[1] = 0.0
    model[7].mask[2] = 0.0
    model.train(mode == "train")
    running = model[1].running_mean.clone()
    x = torch.randn(6, 3, 6, 6)
    block = model[:3](x)  # conv -> BN -> ReLU
    assert torch.equal(block[:, 1], torch.zeros_like(block[:, 1]))
    assert (block[:, 0] != 0).any()
    out = model(x)
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    assert model[1].running_mean[1] == running[1]
    out.square().sum().backward()
    assert model[1].weight.grad[1] == 0 and model[1].bias.grad[1] == 0
    assert torch.equal(model[0].weight.grad[1], torch.zeros_like(model[0].weight.grad[1]))


def test_convert_links_only_a_batch_norm_right_after_a_matching_layer():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(2, affine=False),
                          nn.Sequential(nn.BatchNorm2d(4)))
    bn = model[0]
    params = [p for p in bn.parameters()] + [b for b in bn.buffers()]
    nf.nn.convert(model)
    assert model[0] is bn and all(a is b for a, b in zip(params, [*bn.parameters(), *bn.buffers()]))
    for index in (3, 5):  # after a ReLU; after a conv with 4, not 2, output channels
        assert type(model[index]) is nn.BatchNorm2d
    assert type(model[6][0]) is nn.BatchNorm2d  # another container: not a sibling
    converted = nf.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match=r"layer: expected a masked layer with 4 neurons \(num_features\), got 3"):
        converted[1].follow(nf.nn.MaskedLinear(2, 3))
    with pytest.raises(TypeError, match="layer: expected a MaskedConv2d, MaskedLinear or None, got Conv2d"):
        converted[1].follow(nn.Conv2d(3, 4, 1))


@pytest.mark.parametrize("gate", [False, True])
def test_convert_leaves_train_and_eval_outputs_unchanged_at_initialization(gate):
    model = _conv_bn_model()
    original = copy.deepcopy(model)
    x = torch.randn(6, 3, 6, 6)
    want = _outputs_by_mode(original, x)
    nf.nn.convert(model, gate=gate)
    got = _outputs_by_mode(model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for name, buffer in original.named_buffers():  # the same running statistics
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer)
    if gate:
        assert torch.equal(model[0].current_mask(), torch.ones(4))  # a hard gate, exactly 1, train mode too
        model.train()
        model(x).square().sum().backward()
        assert model[0].gate.logits.grad.abs().sum() > 0  # straight through: the gate learns


# ---- shared layers, converted models, the norm's mask ---------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # the same layer under a second name

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_convert_turns_every_use_of_a_shared_layer_into_one_masked_layer():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 4)
    want = model(x)
    nf.nn.convert(model)
    assert isinstance(model[0], nf.nn.MaskedLinear) and model[2] is model[0]
    torch.testing.assert_close(model(x), want)
    model[0].mask[1] = 0  # pruning the layer prunes both of its uses
    assert (model(x)[:, 1] == 0).all()

    tied = nf.nn.convert(_Tied())
    assert isinstance(tied.a, nf.nn.MaskedLinear) and tied.b is tied.a
    # a tied conv -> BN pair: one masked conv, one masked norm that follows it, in both places
    conv, norm = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)
    model = nf.nn.convert(nn.Sequential(conv, norm, nn.ReLU(), conv, norm))
    assert model[3] is model[0] and model[4] is model[1]
    assert isinstance(model[1], nf.nn.MaskedBatchNorm2d) and model[1].mask_source is model[0]


def test_convert_with_gate_on_a_converted_model_attaches_gates_that_keep_its_masks():
    torch.manual_seed(0)
    model = nf.nn.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    model[0].mask[2] = 0
    x = torch.randn(5, 4)
    want = model(x)
    assert nf.nn.convert(model, gate=True) is model
    assert isinstance(model[0].gate, nf.nn.NeuronGate) and isinstance(model[2].gate, nf.nn.NeuronGate)
    torch.testing.assert_close(model[0].current_mask(), model[0].mask)
    torch.testing.assert_close(model(x), want)
    gate = model[0].gate
    nf.nn.convert(model, gate=True, track_sensitivity=True, skip_zero=False)  # a gate stays; the options apply
    assert model[0].gate is gate and model[0].track_sensitivity and not model[0].skip_zero
    soft = nf.nn.convert(nn.Sequential(nn.Linear(4, 6)))
    soft[0].mask[0] = 0.5
    with pytest.raises(ValueError, match=r"gate: expected a layer whose mask buffer holds only 0 and 1.*0\.5"):
        nf.nn.convert(soft, gate=True)


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_masked_batch_norm_checks_its_mask_like_the_masked_layers(kind):
    bn = nf.nn.MaskedBatchNorm2d(8) if kind == "2d" else nf.nn.MaskedBatchNorm1d(8)
    h = torch.randn(4, 8, 3, 3) if kind == "2d" else torch.randn(4, 8)
    for mask, error, message in [
        (torch.zeros(1), ValueError, r"mask: expected shape \[8\], got \[1\]"),
        (torch.ones(3), ValueError, r"mask: expected shape \[8\], got \[3\]"),
        (torch.ones(8, 1, 1), ValueError, r"mask: expected shape \[8\], got \[8, 1, 1\]"),
        (torch.ones(8, dtype=torch.bool), TypeError, "mask: expected a floating-point tensor"),
        (torch.ones(8, dtype=torch.float64), TypeError,
         r"mask: expected dtype torch.float32 \(the dtype of input\), got torch.float64"),
    ]:
        with pytest.raises(error, match=message):
            bn(h, mask)
    bn(h, torch.ones(8))  # the right mask still runs


def test_a_gate_of_another_size_is_refused_at_construction():
    with pytest.raises(ValueError, match="gate: expected a NeuronGate of 16 neurons .* got one of 10"):
        nf.nn.MaskedConv2d(8, 16, 3, gate=nf.nn.NeuronGate(10))
    with pytest.raises(ValueError, match="gate: expected a NeuronGate of 4 neurons"):
        nf.nn.MaskedLinear(3, 4, gate=nf.nn.NeuronGate(3))


def test_a_layer_given_the_wrong_channel_count_names_the_input():
    conv = nf.nn.MaskedConv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"input: expected 4 channels .* got 5 channels in input of shape \[2, 5, 8, 8\]"):
        conv(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"a 5-d input is the task-batched form \[T, N, C_in, H, W\], which takes "
                                         r"a task-batched weight"):
        conv(torch.randn(3, 2, 4, 8, 8))
    with pytest.raises(TypeError, match=r"stride: expected an int or a pair of ints, got 1.5"):
        nf.masked_conv2d(torch.randn(2, 4, 8, 8), conv.weight, conv.mask, stride=1.5)
