"""Saving and leaving the masked layers: the gate configuration in the state_dict, `export`."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import neuronml_fast as nf

HIDDEN, WAYS, IMAGE = 8, 5, 32
F64 = torch.float64


def _block(in_channels, out_channels):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
                         nn.MaxPool2d(2))


def _conv4(widths=(HIDDEN,) * 4, ways=WAYS, dtype=torch.float32):
    """MAML's Conv4 as a chain: 4 x [3x3 conv, BN, ReLU, 2x2 max-pool], Flatten, Linear."""
    channels = (3, *widths)
    side = IMAGE // 2 ** len(widths)
    model = nn.Sequential(*(_block(channels[i], channels[i + 1]) for i in range(len(widths))), nn.Flatten(),
                          nn.Linear(widths[-1] * side * side, ways))
    return model.to(dtype)


def _trained(model, seed=0):
    """Random weights and batch-norm statistics, as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(10)
    return model


PRUNED = {0: [1, 3], 1: [], 2: [0, 4, 6], 3: [2, 5, 7]}  # block -> pruned channels
HEAD_PRUNED = [1]


def _masked_conv4(gated, dtype=torch.float32):
    """A converted Conv4 with pruned channels: by mask buffers, or (``gated``) by gates of each mode."""
    model = nf.nn.convert(_trained(_conv4(dtype=dtype)), gate=gated)
    layers = [model[i][0] for i in range(4)]
    if not gated:
        for layer, pruned in zip(layers, PRUNED.values()):
            layer.mask[pruned] = 0.0
        model[5].mask[HEAD_PRUNED] = 0.0
        return model
    modes = [dict(mode="hard"), dict(mode="topk", k=HIDDEN - len(PRUNED[1]) - 1),
             dict(mode="soft", temperature=2.0, threshold=0.3), dict(mode="soft", hard_at_eval=False)]
    for layer, pruned, options in zip(layers, PRUNED.values(), modes):
        layer.gate = nf.nn.NeuronGate(HIDDEN, **options).to(dtype)
        with torch.no_grad():
            layer.gate.logits.uniform_(1.0, 3.0)
            layer.gate.logits[pruned] = -1e4  # sigmoid underflows to exactly 0: pruned in every mode
    with torch.no_grad():
        model[5].gate.logits[HEAD_PRUNED] = -3.0
    return model


def _images(dtype=torch.float32, n=6):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _tolerance(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-6, atol=1e-6)


def _plain_types_only(model):
    return all(type(module).__module__.startswith("torch.nn") for module in model.modules())


def _parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# ---- the gate configuration travels with the state_dict ------------------------------------


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train_and_eval_outputs(model, x):
    model.train()
    train = model(x)
    model.eval()
    return train, model(x)


@pytest.mark.parametrize("fresh_gate", [True, False], ids=["into-gated", "into-ungated"])
def test_a_saved_gated_model_reloads_with_the_same_gates(fresh_gate):
    model = _masked_conv4(gated=True, dtype=F64)
    state = _saved(model.state_dict())
    assert state["3.0.gate._extra_state"] == {"mode": "soft", "temperature": 1.0, "threshold": 0.5, "k": None,
                                              "hard_at_eval": False}
    fresh = nf.nn.convert(_conv4(dtype=F64), gate=fresh_gate)  # hard gates, or none
    fresh.load_state_dict(state, strict=True)
    for i, mode in enumerate(["hard", "topk", "soft", "soft"]):
        gate = fresh[i][0].gate
        assert gate.mode == mode and gate.k == model[i][0].gate.k and gate.threshold == model[i][0].gate.threshold
    x = _images(F64)
    for got, want in zip(_train_and_eval_outputs(fresh, x), _train_and_eval_outputs(model, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_gate_state_dict_without_configuration_keeps_the_gates_own():
    gate = nf.nn.NeuronGate(4, mode="topk", k=2)
    gate.load_state_dict({"logits": torch.arange(4.0)}, strict=True)
    assert gate.mode == "topk" and gate.k == 2 and torch.equal(gate(), torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("state,message", [
    ({"mode": "topk", "temperature": 1.0, "threshold": 0.5, "k": 9, "hard_at_eval": True},
     r"k: expected an int in \[0, 4\] for mode 'topk', got 9"),
    ({"mode": "hard"}, r"gate configuration: expected a dict with keys \['hard_at_eval', 'k', 'mode', "),
])
def test_a_bad_gate_configuration_is_rejected(state, message):
    gate = nf.nn.NeuronGate(4)
    with pytest.raises(ValueError, match=message):
        gate.load_state_dict({"logits": torch.zeros(4), "_extra_state": state})


# ---- export: fold the masks, optionally prune ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("prune", [False, True], ids=["fold", "prune"])
@pytest.mark.parametrize("gated", [False, True], ids=["mask", "gate"])
def test_export_gives_a_plain_model_with_the_same_eval_outputs(gated, prune, dtype):
    model = _masked_conv4(gated, dtype)
    model.eval()
    x = _images(dtype)
    want = model(x)
    exported = nf.nn.export(model, prune=prune)
    assert _plain_types_only(exported)
    assert not exported.training  # each module keeps its mode
    torch.testing.assert_close(exported(x), want, **_tolerance(dtype))
    assert torch.equal(exported(x)[:, HEAD_PRUNED], torch.zeros_like(want[:, HEAD_PRUNED]))  # output shape kept
    count = _parameter_count(exported)
    assert count < _parameter_count(model) if prune else count == _parameter_count(_conv4())
    assert isinstance(model[0][0], nf.nn.MaskedConv2d)  # the masked model is left as it was
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def _active_widths():
    return tuple(HIDDEN - len(pruned) for pruned in PRUNED.values())


@pytest.mark.parametrize("prune", [False, True], ids=["fold", "prune"])
def test_an_exported_state_dict_loads_into_the_plain_model_built_by_hand(prune):
    model = _masked_conv4(gated=False).eval()
    exported = nf.nn.export(model, prune=prune)
    by_hand = _conv4(_active_widths() if prune else (HIDDEN,) * 4).eval()
    by_hand.load_state_dict(exported.state_dict(), strict=True)
    x = _images()
    torch.testing.assert_close(by_hand(x), model(x), rtol=1e-6, atol=1e-6)
    if prune:
        assert [by_hand[i][0].out_channels for i in range(4)] == list(_active_widths())


def test_export_folds_a_fractional_mask_into_weights_and_batch_norm():
    model = nf.nn.convert(_trained(_conv4(dtype=F64)))
    model[1][0].mask.copy_(torch.linspace(0.0, 1.5, HIDDEN, dtype=F64))  # its BatchNorm follows it
    model.eval()
    x = _images(F64)
    exported = nf.nn.export(model, prune=True)
    assert exported[1][0].out_channels == HIDDEN - 1  # the one zero of the linspace
    torch.testing.assert_close(exported(x), model(x), **_tolerance(F64))


def test_export_of_a_linear_chain_prunes_through_batch_norm_1d_and_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6), nn.Linear(4 * 6 * 6, 10),
                          nn.BatchNorm1d(10), nn.Tanh(), nn.Dropout(), nn.Linear(10, 3)).double()
    nf.nn.convert(model)
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.2, 0.2)
    model[0].mask[2] = 0.0
    model[3].mask[[0, 7]] = 0.0
    with torch.no_grad():  # an unlinked norm of flattened features, zero on channels 1 and 2's blocks
        model[2].weight[36:108] = 0.0
        model[2].bias[36:108] = 0.0
    model.eval()
    x = torch.randn(5, 3, 8, 8, dtype=F64)
    exported = nf.nn.export(model, prune=True)
    assert exported[0].out_channels == 2 and exported[2].num_features == 2 * 36 and exported[3].in_features == 72
    assert exported[3].out_features == 8 and exported[4].num_features == 8 and exported[7].in_features == 8
    torch.testing.assert_close(exported(x), model(x), **_tolerance(F64))


def test_export_of_a_single_layer():
    layer = nf.nn.MaskedLinear(4, 3).double()
    layer.mask[1] = 0.0
    x = torch.randn(2, 4, dtype=F64)
    exported = nf.nn.export(layer, prune=True)
    assert type(exported) is nn.Linear
    torch.testing.assert_close(exported(x), layer(x), **_tolerance(F64))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

    def forward(self, x):
        return self.head(x + torch.relu(self.norm(self.conv(x))))


def test_prune_rejects_a_model_that_is_not_a_chain_and_fold_still_exports_it():
    model = nf.nn.convert(_Residual()).double().eval()
    model.conv.mask[0] = 0.0
    with pytest.raises(ValueError, match=r"prune: expected a chain .* 'model' \(_Residual\) is a container other "
                                         r"than nn.Sequential.*prune=False"):
        nf.nn.export(model, prune=True)
    nested = nn.Sequential(copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"'0' \(_Residual\)"):
        nf.nn.export(nested, prune=True)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    exported = nf.nn.export(model)
    assert _plain_types_only(nn.Sequential(*exported.children()))
    assert type(exported.conv) is nn.Conv2d and type(exported.norm) is nn.BatchNorm2d
    torch.testing.assert_close(exported(x), model(x), **_tolerance(F64))


class _ShiftedReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) + 1.0  # no longer zero-preserving: a subclass is judged by its forward


@pytest.mark.parametrize("module,message", [
    (nn.Softmax(dim=1), r"'2' \(Softmax\) is not a module export can prove to act on each channel separately"),
    (_ShiftedReLU(), r"'2' \(_ShiftedReLU\) is not a module export can prove"),
    (nn.Flatten(0), r"'2' \(Flatten\) flattens dims 0..-1, expected start_dim=1, end_dim=-1"),
])
def test_prune_rejects_a_module_it_cannot_see_through(module, message):
    model = nf.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), module, nn.Conv2d(4, 2, 1)))
    with pytest.raises(ValueError, match=message):
        nf.nn.export(model, prune=True)


def test_prune_keeps_channels_that_are_not_zero_where_they_are_read_with_a_warning():
    torch.manual_seed(0)
    # Pre-activation order: the BatchNorm after the ReLU is not linked to the conv's mask, so a
    # pruned channel leaves it as a constant the next conv reads.
    model = nf.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2),
                                        nn.Conv2d(4, 2, 1))).double()
    with torch.no_grad():
        model[2].bias.fill_(0.5)
    model[0].mask[1] = 0.0
    model[3].mask[0] = 0.0
    model.eval()
    with pytest.warns(UserWarning) as caught:
        exported = nf.nn.export(model, prune=True)
    messages = [str(w.message) for w in caught]
    assert any("1 pruned channels of '0' kept: they are not zero where '3' reads them" in m for m in messages)
    assert any("1 pruned channels of '3' kept: removing them would break the groups of '3'" in m for m in messages)
    assert [exported[0].out_channels, exported[3].out_channels] == [4, 4]
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    torch.testing.assert_close(exported(x), model(x), **_tolerance(F64))


def test_prune_without_pruned_channels_warns_nothing():
    model = nf.nn.convert(_trained(_conv4())).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = nf.nn.export(model, prune=True)
    assert _parameter_count(exported) == _parameter_count(model)


def test_export_rejects_a_task_batched_mask():
    model = nf.nn.convert(_conv4())
    model[0][0].mask = torch.ones(3, HIDDEN)  # [T, C]: one mask per task
    with pytest.raises(ValueError, match=r"mask of '0.0': expected one value per neuron, shape \[8\], got shape "
                                         r"\[3, 8\] \(a task-batched mask: export one model per task"):
        nf.nn.export(model)


def test_export_rejects_a_layer_without_a_torch_nn_equivalent():
    model = nn.Sequential(nf.nn.MaskedLinear(4, 4), nf.nn.PlasticLinear(4, 2))
    message = r"model: expected layers with a torch.nn equivalent, got '1' \(PlasticLinear\)"
    with pytest.raises(TypeError, match=message):
        nf.nn.export(model)


@pytest.mark.parametrize("norm_options", [dict(affine=False), dict(track_running_stats=False)],
                         ids=["not-affine", "batch-statistics"])
def test_export_folds_the_mask_into_any_linked_batch_norm(norm_options):
    torch.manual_seed(0)
    model = nf.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **norm_options), nn.ReLU(),
                                        nn.Conv2d(4, 2, 3))).double()
    model[0].mask[2] = 0.0
    model.eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    for prune in (False, True):
        exported = nf.nn.export(model, prune=prune)
        assert type(exported[1]) is nn.BatchNorm2d and exported[1].num_features == (3 if prune else 4)
        torch.testing.assert_close(exported(x), model(x), **_tolerance(F64))
