"""Drop-in structure-gated layers: MaskedConv2d, MaskedLinear, MaskedBatchNorm1d/2d, NeuronGate, convert.

Where the mask comes from, first match wins: the ``mask=`` argument of ``forward``, the layer's
``gate`` (a `NeuronGate`), or its ``mask`` buffer (ones at construction, so a fresh layer
computes exactly what nn.Conv2d / nn.Linear computes).

state_dict: the same keys as nn.Conv2d / nn.Linear, plus ``mask`` (and, when a gate is attached,
``gate.logits`` and ``gate._extra_state``: the gate's mode, k, temperature and threshold). A plain
nn.Conv2d / nn.Linear state_dict loads with ``strict=True``: a missing ``mask`` means "all neurons
active". A gated state_dict loaded into a layer without a gate attaches one.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .._alloc import accumulation_dtype
from ..ops.masked import masked_conv2d, masked_linear


class NeuronGate(nn.Module):
    """Learnable per-neuron structure: logits -> mask in [0, 1].

    Modes:
      * ``"soft"``: ``sigmoid(logits / temperature)``; at eval (``hard_at_eval``) the mask is
        hardened by ``threshold`` so pruned neurons skip compute.
      * ``"hard"``: 1 where ``sigmoid(logits / temperature) > threshold``, else 0, with a
        straight-through gradient (the backward sees the sigmoid).
      * ``"topk"``: the ``k`` neurons with the largest logits are 1, the rest 0, straight-through.

    The configuration (mode, k, temperature, threshold, hard_at_eval) is saved in the state_dict
    with the logits. Hard masks are exactly 0/1, so the masked layers skip the zeros. Note that with
    ``skip_zero=True`` a pruned neuron's mask gradient is exactly 0 (SPEC section 2): a
    straight-through gate then cannot revive it. Train with ``skip_zero=False`` (true
    gradients everywhere) or a soft gate when pruned neurons must be able to come back.
    """

    MODES = ("soft", "hard", "topk")

    def __init__(self, num_neurons, mode="soft", temperature=1.0, threshold=0.5, k=None, init_logit=3.0,
                 hard_at_eval=True):
        super().__init__()
        self._configure(num_neurons, mode, temperature, threshold, k, hard_at_eval)
        self.logits = nn.Parameter(torch.full((num_neurons,), float(init_logit)))

    def _configure(self, num_neurons, mode, temperature, threshold, k, hard_at_eval):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold: expected a number in (0, 1), got {threshold!r}")
        if mode == "topk" and (k is None or not 0 <= k <= num_neurons):
            raise ValueError(f"k: expected an int in [0, {num_neurons}] for mode 'topk', got {k!r}")
        self.mode, self.temperature, self.threshold, self.k, self.hard_at_eval = (
            mode, float(temperature), float(threshold), k, bool(hard_at_eval))

    # The configuration travels in the state_dict (key ``_extra_state``), so loading a saved
    # gated model restores its mode, k, temperature and threshold, not only its logits.
    def get_extra_state(self):
        return {"mode": self.mode, "temperature": self.temperature, "threshold": self.threshold, "k": self.k,
                "hard_at_eval": self.hard_at_eval}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or set(state) != set(self.get_extra_state()):
            raise ValueError(f"gate configuration: expected a dict with keys {sorted(self.get_extra_state())}, "
                             f"got {state!r}")
        self._configure(self.logits.shape[-1], **state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state_dict saved without the configuration (only logits) keeps this gate's own.
        key = prefix + "_extra_state"
        if key not in state_dict:
            state_dict = {**state_dict, key: self.get_extra_state()}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def probabilities(self, shift=None):
        """``sigmoid((logits + shift) / temperature)``; ``shift [..., C]`` conditions the mask (e.g. per task)."""
        logits = self.logits if shift is None else self.logits + shift
        return torch.sigmoid(logits / self.temperature)

    def _hard(self, probs):
        if self.mode == "topk":
            hard = torch.zeros_like(probs)
            return hard.scatter_(-1, probs.topk(self.k, dim=-1).indices, 1.0)
        return (probs > self.threshold).to(probs.dtype)

    def forward(self, shift=None):
        """The mask ``[C]`` (or ``[..., C]`` with a ``shift [..., C]``, e.g. one mask per task)."""
        probs = self.probabilities(shift)
        if self.mode == "soft":
            return self._hard(probs) if (self.hard_at_eval and not self.training) else probs
        hard = self._hard(probs)
        if not self.training:
            return hard
        return hard + (probs - probs.detach())  # exactly 0/1 in value, sigmoid in gradient

    def active_fraction(self):
        with torch.no_grad():
            mask = self._hard(self.probabilities()) if self.mode != "soft" else self.probabilities()
            return float((mask != 0).float().mean())

    def extra_repr(self):
        return (f"{self.logits.numel()}, mode={self.mode!r}, temperature={self.temperature}, "
                f"threshold={self.threshold}, k={self.k}")


class _MaskedMixin:
    """Mask buffer, optional gate, sensitivity tracking; shared by MaskedConv2d and MaskedLinear."""

    def _init_masking(self, num_neurons, gate, skip_zero, track_sensitivity):
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("mask", torch.ones(num_neurons, **factory))
        if gate is True:
            # Hard: exactly 1 at initialization, so a fresh gated layer computes what the plain one does.
            gate = NeuronGate(num_neurons, mode="hard").to(**factory)
        if gate is not None and not isinstance(gate, NeuronGate):
            raise TypeError(f"gate: expected a NeuronGate, True or None, got {type(gate).__name__}")
        if gate is not None and gate.logits.shape[-1] != num_neurons:
            raise ValueError(f"gate: expected a NeuronGate of {num_neurons} neurons (one per output channel or "
                             f"feature), got one of {gate.logits.shape[-1]}")
        self.gate = gate
        self._last_mask = _LastMask()
        self.skip_zero = skip_zero
        self.track_sensitivity = track_sensitivity
        self.register_buffer("sensitivity", torch.zeros(num_neurons, device=self.weight.device,
                                                        dtype=accumulation_dtype(self.weight.dtype)),
                             persistent=False)

    def reset_sensitivity(self):
        self.sensitivity.zero_()

    def _apply(self, fn, *args, **kwargs):
        # .half() / .double() convert buffers; the sensitivity stays in the accumulation dtype
        # (float64 for float64 layers, float32 otherwise).
        result = super()._apply(fn, *args, **kwargs)
        self.sensitivity = self.sensitivity.to(accumulation_dtype(self.weight.dtype))
        return result

    def current_mask(self, mask=None):
        if mask is not None:
            return mask
        if self.gate is not None:
            return self.gate().to(self.weight.dtype)
        return self.mask

    def _published(self, mask):
        """``mask``, kept as the mask of this layer's latest forward for the norms that follow it
        (`last_mask`)."""
        self._last_mask.mask = mask
        return mask

    def last_mask(self):
        """The mask of this layer's latest forward (its ``mask=`` argument, or its gate's or buffer's
        mask), or its current mask before any. A following norm applies this one: the mask the layer
        itself computed with, also when a tool runs the layer as a rebuilt copy (higher's
        innerloop_ctx copies this attribute by reference, so the copy's forward lands here)."""
        mask = self._last_mask.mask
        return self.current_mask() if mask is None else mask

    def _tracked(self, mask):
        """With track_sensitivity, route |mask * dL/dmask| into the sensitivity buffer.

        The mask gradient comes out of the layer's fused backward (its prologue reduces
        grad_out * pre per neuron), so tracking costs no extra pass over activations.
        """
        if not (self.track_sensitivity and torch.is_grad_enabled()):
            return mask
        if not mask.requires_grad:
            mask = mask.detach().requires_grad_()
        value = mask.detach()
        buffer = self.sensitivity

        def accumulate(grad):
            taylor = (value * grad).abs()
            buffer.add_(taylor.reshape(-1, buffer.numel()).sum(0).to(buffer.dtype))

        mask.register_hook(accumulate)
        return mask

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An nn.Conv2d / nn.Linear state_dict has no mask: that means every neuron is active.
        key = prefix + "mask"
        if key not in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = torch.ones_like(self.mask)
        # A gated layer's state_dict rebuilds its gate in a layer converted without one, so a
        # saved model reloads with the same behaviour (the gate's configuration loads with it).
        if self.gate is None and prefix + "gate.logits" in state_dict:
            self.gate = NeuronGate(self.mask.numel(), mode="hard").to(device=self.weight.device,
                                                                      dtype=self.weight.dtype)
            self.gate.train(self.training)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d whose output channels are gated by a structure mask (SPEC section 2).

    Same constructor arguments, input forms and state_dict keys as nn.Conv2d (string padding
    ``"same"`` / ``"valid"``, every ``padding_mode``, which is pre-padded in PyTorch, unbatched
    ``[C_in, H, W]`` inputs), plus ``gate`` (a NeuronGate, or True for a hard NeuronGate whose
    mask starts at exactly 1), ``skip_zero`` and ``track_sensitivity``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, gate=None, skip_zero=True,
                 track_sensitivity=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_masking(out_channels, gate, skip_zero, track_sensitivity)

    def forward(self, input, mask=None):
        mask = self._tracked(self._published(self.current_mask(mask)))
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: the padding (string padding's too) by F.pad
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return masked_conv2d(input, self.weight, mask, self.bias, self.stride, padding, self.dilation, self.groups,
                             skip_zero=self.skip_zero)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear whose output features are gated by a structure mask (SPEC section 2).

    Same constructor arguments and state_dict keys as nn.Linear, plus ``gate``, ``skip_zero`` and
    ``track_sensitivity`` as in `MaskedConv2d`.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, gate=None,
                 skip_zero=True, track_sensitivity=False):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_masking(out_features, gate, skip_zero, track_sensitivity)

    def forward(self, input, mask=None):
        mask = self._tracked(self._published(self.current_mask(mask)))
        return masked_linear(input, self.weight, mask, self.bias, skip_zero=self.skip_zero)


class _LastMask:
    """Where a masked layer keeps the mask of its latest forward (`_MaskedMixin.last_mask`). A plain
    object, so that a copy of the layer made attribute by attribute shares it; copy.deepcopy and
    pickling give the copy an empty one (the mask belongs to one forward's graph)."""

    def __init__(self):
        self.mask = None

    def __deepcopy__(self, memo):
        return _LastMask()

    def __getstate__(self):
        return {"mask": None}


class _Reference:
    """A module held by another without being its submodule (its parameters stay out of the holder's
    state_dict and parameters()). Not an nn.Module attribute: nn.Module.__setattr__, and tools that
    rebuild a module tree attribute by attribute (higher's innerloop_ctx), register a module value as
    a child. copy.deepcopy and pickling copy the module it holds once, with the rest of the tree."""

    def __init__(self, module):
        self.module = module


class _MaskedBatchNorm:
    """BatchNorm that keeps pruned neurons silent: ``mask[c] * BN(x)[c]``.

    Design: in a conv -> BN -> ReLU block the mask is applied *after* the normalization. A
    mask before BN would be normalized away (BN is invariant to a per-channel scale), and a
    pruned channel of exact zeros would come out of BN as ``beta``. Here pruned channels are
    exact zeros with zero gradients, and their running statistics are left untouched. Give
    the conv the same mask (it then skips the pruned neurons' compute).

    Mask source: the ``mask=`` argument of ``forward``, else the mask of the latest forward of
    the layer set with ``follow(layer)`` (what `convert` sets up; `last_mask`), else none (plain
    BatchNorm). The followed layer is a reference, not a submodule: its parameters stay out of
    this module's state_dict. copy.deepcopy and pickling keep the link inside the copy; a tool
    that rebuilds the module tree itself (higher's innerloop_ctx) keeps the reference to the
    original layer, whose `last_mask` is then the mask its rebuilt copy computed.
    """

    _mask_source = None  # a _Reference to the followed layer

    @property
    def mask_source(self):
        """The masked layer whose mask this norm applies when ``forward`` gets none (or None)."""
        return None if self._mask_source is None else self._mask_source.module

    def follow(self, layer):
        """Apply ``layer``'s current mask (a MaskedConv2d or MaskedLinear; None: no mask). Returns self."""
        if layer is not None and not isinstance(layer, _MaskedMixin):
            raise TypeError(f"layer: expected a MaskedConv2d, MaskedLinear or None, got {type(layer).__name__}")
        if layer is not None and layer.mask.numel() != self.num_features:
            raise ValueError(f"layer: expected a masked layer with {self.num_features} neurons (num_features), "
                             f"got {layer.mask.numel()}")
        self._mask_source = None if layer is None else _Reference(layer)
        return self

    def forward(self, input, mask=None):
        if mask is None and self._mask_source is not None:
            mask = self._mask_source.module.last_mask()
        if mask is None:
            return super().forward(input)
        self._check_mask(mask, input)
        keep = mask != 0
        updating = self.training and self.track_running_stats and self.running_mean is not None
        if not updating:
            out = super().forward(input)
        else:
            # Normalize with copies of the running statistics, then take the updates of the
            # active neurons only: pruned neurons saw no data.
            self.num_batches_tracked.add_(1)
            momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
            mean, var = self.running_mean.clone(), self.running_var.clone()
            out = F.batch_norm(input, mean, var, self.weight, self.bias, True, momentum, self.eps)
            with torch.no_grad():
                self.running_mean.copy_(torch.where(keep, mean, self.running_mean))
                self.running_var.copy_(torch.where(keep, var, self.running_var))
        shape = (1, -1) + (1,) * (input.dim() - 2)
        keep = keep.view(shape)
        return torch.where(keep, mask.view(shape).to(out.dtype), 0) * torch.where(keep, out, 0)

    def _check_mask(self, mask, input):
        """One value per neuron, floating, on the input's device, as the masked layers take it; in the
        input's dtype or the layer's (the dtype of the mask a followed layer gives, also when autocast
        runs the layers in a lower precision)."""
        own = next((t.dtype for t in (self.weight, self.running_mean) if t is not None), input.dtype)
        accepted = {input.dtype: "the dtype of input"}
        accepted.setdefault(own, "the dtype of the layer")
        _checks.like_in_dtypes("mask", mask, "input", input, accepted, shape=(self.num_features,))


class MaskedBatchNorm2d(_MaskedBatchNorm, nn.BatchNorm2d):
    __doc__ = _MaskedBatchNorm.__doc__


class MaskedBatchNorm1d(_MaskedBatchNorm, nn.BatchNorm1d):
    __doc__ = _MaskedBatchNorm.__doc__.replace("conv -> BN -> ReLU", "linear -> BN -> ReLU")


def convert(module, *, gate=False, skip_zero=True, track_sensitivity=False):
    """Swap every nn.Conv2d / nn.Linear inside ``module`` (in place) for its masked twin, and every
    BatchNorm that normalizes one of them for a masked BatchNorm that applies its mask.

    The parameters and buffers are the same objects (an optimizer built before still updates
    them), and the output is unchanged while all masks are 1, in train and eval mode.

    * BatchNorm: an nn.BatchNorm2d (nn.BatchNorm1d) registered right after an nn.Conv2d
      (nn.Linear) in the same parent, with as many features as it has neurons (the conv -> BN
      order of nn.Sequential blocks and torchvision's models), becomes a `MaskedBatchNorm2d`
      (`MaskedBatchNorm1d`) that follows that layer's mask: a pruned neuron is then an exact zero
      after its BatchNorm too, instead of BN's shift ``beta``. Other BatchNorms stay as they are;
      link one by hand with ``MaskedBatchNorm2d.follow(layer)``.
    * ``gate=True`` attaches a hard (straight-through) `NeuronGate` to each swapped layer: its
      mask is exactly 1 at initialization, so the output is unchanged in train mode too (a soft
      gate would start at sigmoid(3) = 0.95), and its logits learn through the sigmoid. With
      ``skip_zero=True`` a neuron whose gate reaches 0 gets no gradient from the loss and stays
      pruned; pass ``skip_zero=False`` to let pruned neurons come back.

    * A layer used in several places (the same module object registered twice, as in tied or
      repeated layers) becomes one masked layer, registered in each place: pruning it prunes every
      use.
    * A layer that is already masked stays the same object; ``gate=True`` attaches its gate where
      it has none (the gate starts at the layer's 0/1 mask buffer, so outputs stay the same), and
      ``skip_zero=False`` and ``track_sensitivity=True`` apply to it too.

    Returns ``module`` (or its replacement when ``module`` itself is a Conv2d / Linear).
    """
    return _convert(module, gate, skip_zero, track_sensitivity, {})


def _convert(module, gate, skip_zero, track_sensitivity, converted):
    """`convert` with ``converted``: {id(module): its replacement} of the modules already visited, so
    each module is converted once, whatever the number of places it is registered in."""
    if id(module) in converted:
        return converted[id(module)]
    replacement = _masked_twin(module, gate, skip_zero, track_sensitivity)
    converted[id(module)] = replacement if replacement is not None else module
    if replacement is not None:
        return replacement
    if isinstance(module, _MaskedMixin):
        _apply_options(module, gate, skip_zero, track_sensitivity)
    previous = None
    # module._modules, not named_children(): that one lists a module registered twice only once.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        seen = id(child) in converted  # then it is converted already, as its first place decided
        child = _convert(child, gate, skip_zero, track_sensitivity, converted)
        if not seen:
            child = _norm_following(child, previous, converted)
        setattr(module, name, child)
        previous = child
    return module


def _apply_options(layer, gate, skip_zero, track_sensitivity):
    """`convert`'s options, on a layer that is already masked: those given away from their defaults."""
    if gate and layer.gate is None:
        layer.gate = _gate_holding(layer)
    if not skip_zero:
        layer.skip_zero = False
    if track_sensitivity:
        layer.track_sensitivity = True


def _gate_holding(layer):
    """A hard gate whose mask is ``layer``'s mask buffer (0/1 values only, what a hard gate can hold)."""
    mask = layer.mask.detach()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"gate: expected a layer whose mask buffer holds only 0 and 1 (what a hard gate can start "
                         f"from), got a {type(layer).__name__} with mask values "
                         f"{mask.unique().tolist()[:6]}; attach a NeuronGate by hand")
    gate = NeuronGate(mask.numel(), mode="hard").to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        gate.logits.copy_(torch.where(mask != 0, gate.logits, -gate.logits))
    gate.train(layer.training)
    return gate


def _masked_twin(module, gate, skip_zero, track_sensitivity):
    if type(module) not in (nn.Conv2d, nn.Linear):
        return None
    options = dict(gate=gate or None, skip_zero=skip_zero, track_sensitivity=track_sensitivity,
                   device=module.weight.device, dtype=module.weight.dtype)
    if type(module) is nn.Conv2d:
        twin = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None,
                            module.padding_mode, **options)
    else:
        twin = MaskedLinear(module.in_features, module.out_features, module.bias is not None, **options)
    twin.weight = module.weight
    twin.bias = module.bias
    twin.train(module.training)
    return twin


# The BatchNorm that normalizes each masked layer's output, and its masked twin.
_MASKED_NORMS = {nn.BatchNorm2d: (MaskedConv2d, MaskedBatchNorm2d), nn.BatchNorm1d: (MaskedLinear, MaskedBatchNorm1d)}


def _norm_following(module, previous, converted):
    """``module``, or its masked twin following ``previous`` where ``module`` is the BatchNorm of
    ``previous``'s output (see `convert`); ``converted`` records the twin for the module's other places."""
    layer_type, twin_type = _MASKED_NORMS.get(type(module), (None, None))
    if layer_type is None or not isinstance(previous, layer_type) or previous.mask.numel() != module.num_features:
        return module
    twin = twin_type(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                     device="meta")
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        setattr(twin, name, tensor)
    twin.train(module.training)
    converted[id(module)] = twin
    return twin.follow(previous)
