"""Back to plain torch.nn: `export` folds the masks into the weights and, on a chain, prunes.

A masked layer computes ``mask[c] * (conv(x, W)[c] + b[c])``, which is ``conv(x, W')`` with
``W'[c] = mask[c] * W[c]`` and ``b'[c] = mask[c] * b[c]``; a masked BatchNorm computes
``mask[c] * BN(x)[c]``, which is a BatchNorm whose affine weight and bias are scaled by
``mask[c]``. A pruned neuron (mask 0) thus becomes an all-zero row of weights, and its output is
an exact zero through BatchNorm, ReLU and pooling until the next layer reads it: that next layer
can drop the matching input channels, and the row itself can go.
"""

import copy
import warnings

import torch
from torch import nn

from .masked import MaskedBatchNorm2d, MaskedConv2d, _MaskedBatchNorm, _MaskedMixin

__all__ = ["export"]


def export(model, *, prune=False):
    """A plain ``torch.nn`` copy of ``model`` whose eval-mode outputs equal ``model``'s.

    Every `MaskedConv2d` / `MaskedLinear` becomes an ``nn.Conv2d`` / ``nn.Linear`` with its
    eval-mode mask (the gate's mask at eval, else the ``mask`` buffer) folded into its weight and
    bias, and every masked BatchNorm an ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` with the mask of
    the layer it follows folded into its affine weight and bias (it becomes affine if it was not
    and that mask is not all ones). Pruned neurons are then exact zeros, as in the masked model.
    ``model`` is left unchanged; the copy keeps each module's train/eval mode. Models whose
    ``forward`` passes ``mask=`` to the layers itself cannot be exported: the mask must come
    from the layers (their gate or buffer), as after `convert`.

    ``prune=True`` also removes the channels that are exact zeros where the next layer reads
    them (pruned neurons), and those input channels of that next layer (across a Flatten, the
    matching feature blocks), giving a smaller model with the same eval-mode outputs. It needs
    a chain: an ``nn.Sequential`` (nested ones too) of Conv2d, Linear, BatchNorm1d/2d,
    activations, dropout, pooling and Flatten; anything else raises ValueError naming the
    module (export with ``prune=False`` then). The last layer keeps its pruned outputs (as
    zeros), so the output shape is unchanged. Where a grouped convolution would lose its group
    structure, or an unlinked BatchNorm (or an activation with f(0) != 0) turns a pruned
    channel into a nonzero constant, those channels stay, with a warning naming the layers.

    Raises TypeError where a layer of this package has no ``torch.nn`` equivalent (e.g. the
    plastic layers), and ValueError for a mask that is not one value per neuron (one exported
    model per task: give the layers that task's mask first).
    """
    exported = copy.deepcopy(model)
    masks = {layer: _eval_mask(name or "model", layer)
             for name, layer in exported.named_modules() if isinstance(layer, _MaskedMixin)}
    exported = _folded(exported, masks, {})
    _check_plain(exported)
    if prune:
        _prune_chain(exported)
    return exported


# ---- folding -------------------------------------------------------------------------------


def _eval_mask(name, layer):
    """``layer``'s mask as the model in eval mode applies it (a gate is hardened at eval)."""
    with torch.no_grad():
        if layer.gate is None:
            mask = layer.mask
        else:
            training = layer.gate.training
            layer.gate.train(False)
            try:
                mask = layer.gate().to(layer.weight.dtype)
            finally:
                layer.gate.train(training)
    neurons = layer.weight.shape[0]
    if tuple(mask.shape) != (neurons,):
        raise ValueError(f"mask of {name!r}: expected one value per neuron, shape [{neurons}], got shape "
                         f"{list(mask.shape)} (a task-batched mask: export one model per task, with that "
                         f"task's mask set on the layer)")
    return mask.detach().clone()


def _folded(module, masks, done):
    """``module`` with every masked layer (in place in its parent) replaced by its folded plain twin."""
    if module in done:  # a module shared by two parents stays shared
        return done[module]
    if isinstance(module, _MaskedMixin):
        replacement = _plain_layer(module, masks[module])
    elif isinstance(module, _MaskedBatchNorm):
        replacement = _plain_norm(module, _followed_mask(module, masks))
    else:
        for name, child in list(module.named_children()):
            setattr(module, name, _folded(child, masks, done))
        replacement = module
    done[module] = replacement
    return replacement


def _followed_mask(norm, masks):
    source = norm.mask_source
    if source is None:
        return None
    return masks[source] if source in masks else _eval_mask("mask_source", source)


def _scaled(tensor, mask):
    """``mask[c] * tensor[c]``; exactly 0 where ``mask[c]`` is 0, as the masked layers give."""
    mask = mask.view((-1,) + (1,) * (tensor.dim() - 1))
    return torch.where(mask != 0, tensor * mask, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def _plain_layer(layer, mask):
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, MaskedConv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    with torch.no_grad():
        plain.weight.copy_(_scaled(layer.weight, mask))
        if layer.bias is not None:
            plain.bias.copy_(_scaled(layer.bias, mask))
    return plain.train(layer.training)


def _plain_norm(norm, mask):
    folds = mask is not None and not bool((mask == 1).all())
    affine = norm.affine or folds
    reference = next(iter([*norm.parameters(), *norm.buffers()]), mask)
    factory = {"device": None if reference is None else reference.device,
               "dtype": None if reference is None or not reference.is_floating_point() else reference.dtype}
    kind = nn.BatchNorm2d if isinstance(norm, MaskedBatchNorm2d) else nn.BatchNorm1d
    plain = kind(norm.num_features, norm.eps, norm.momentum, affine, norm.track_running_stats, **factory)
    with torch.no_grad():
        if norm.track_running_stats:
            plain.running_mean.copy_(norm.running_mean)
            plain.running_var.copy_(norm.running_var)
            plain.num_batches_tracked.copy_(norm.num_batches_tracked)
        if affine:
            weight = norm.weight if norm.affine else torch.ones_like(plain.weight)
            bias = norm.bias if norm.affine else torch.zeros_like(plain.bias)
            plain.weight.copy_(_scaled(weight, mask) if folds else weight)
            plain.bias.copy_(_scaled(bias, mask) if folds else bias)
    return plain.train(norm.training)


def _check_plain(model):
    for name, module in model.named_modules():
        if type(module).__module__.split(".")[0] == "neuronml_fast":
            raise TypeError(f"model: expected layers with a torch.nn equivalent, got {name or 'model'!r} "
                            f"({type(module).__name__}), which has none")


# ---- pruning a chain -----------------------------------------------------------------------

# Modules that act on each channel (feature) separately and map an exact zero to an exact zero.
_KEEPS_ZERO = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
               nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
               nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
# Per channel too, but f(0) != 0: a zero channel becomes a constant the next layer reads.
_BREAKS_ZERO = (nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Softplus)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Conv2d, nn.Linear)
_CHAIN_TYPES = "Conv2d, Linear, BatchNorm1d/2d, activations, dropout, pooling and Flatten(start_dim=1)"


def _acts_as(module, types):
    """``module`` is one of ``types`` and runs its ``forward`` (a subclass may compute otherwise)."""
    return any(isinstance(module, kind) and type(module).forward is kind.forward for kind in types)


def _not_a_chain(name, module, why):
    return ValueError(f"prune: expected a chain (nn.Sequential of {_CHAIN_TYPES}); {name or 'model'!r} "
                      f"({type(module).__name__}) {why}. Export with prune=False to fold the masks only")


def _chain_leaves(module, name=""):
    """[(name, module)] in the order an nn.Sequential (nested ones flattened) runs them."""
    if _acts_as(module, [nn.Sequential]):
        leaves = []
        for child_name, child in module.named_children():
            leaves += _chain_leaves(child, f"{name}.{child_name}" if name else child_name)
        return leaves
    return [(name, module)]


class _Segment:
    """A layer's output on its way to the next layer: the modules in between and what is zero.

    ``zero`` marks the units that are exact zeros at this point: channels, or features once a
    Flatten has been resolved (``block`` features per channel, channel-major as nn.Flatten lays
    them out).
    """

    def __init__(self, name, layer):
        self.name, self.layer = name, layer
        self.channels = _out_units(layer)
        self.zero = _zero_rows(layer)
        self.pruned = self.zero.clone()
        self.spatial = isinstance(layer, nn.Conv2d)
        self.flat = not self.spatial  # units are features: a Linear's output, or images flattened
        self.flatten_pending, self.block = False, 1
        self.norms = []  # (name, norm, in feature units)

    def units(self):
        return self.channels * self.block

    def resolve_flatten(self, name, module, features):
        if features % self.channels:
            raise _not_a_chain(name, module, f"reads {features} features, not a multiple of the "
                                             f"{self.channels} channels of {self.name!r} flattened")
        self.block, self.flatten_pending = features // self.channels, False
        self.zero = self.zero.repeat_interleave(self.block)

    def removable(self):
        """The producer's channels that are zero in every unit the next layer reads."""
        return self.zero.view(self.channels, self.block).all(1)


def _out_units(layer):
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _in_units(layer):
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def _zero_rows(layer):
    """Output channels that are exact zeros for any finite input: all-zero weights and bias."""
    zero = (layer.weight.detach().flatten(1) == 0).all(1)
    return zero if layer.bias is None else zero & (layer.bias.detach() == 0)


def _prune_chain(model):
    leaves = _chain_leaves(model)
    seen = set()
    for name, module in leaves:
        if module in seen:
            raise _not_a_chain(name, module, "appears twice in the chain (shared weights)")
        seen.add(module)
    plans, segment = [], None
    for name, module in leaves:
        if _acts_as(module, _LAYERS):
            if segment is not None:
                _enter_layer(segment, name, module)
                plans.append((segment, name, module))
            segment = _Segment(name, module)
        elif segment is None:
            _check_leaf(name, module)  # before the first layer: the model's input, nothing to prune
        else:
            _pass_through(segment, name, module)
    for segment, name, layer in plans:
        _apply(segment, name, layer)


def _check_leaf(name, module):
    if _acts_as(module, [nn.Flatten]):
        _check_flatten(name, module)
    elif not _acts_as(module, (*_KEEPS_ZERO, *_BREAKS_ZERO, *_NORMS, nn.Hardtanh)):
        _reject(name, module)


def _reject(name, module):
    if any(True for _ in module.children()):
        raise _not_a_chain(name, module, "is a container other than nn.Sequential, whose forward may not be a "
                                         "chain (a residual, a branch)")
    raise _not_a_chain(name, module, "is not a module export can prove to act on each channel separately")


def _check_flatten(name, module):
    if module.start_dim != 1 or module.end_dim != -1:
        raise _not_a_chain(name, module, f"flattens dims {module.start_dim}..{module.end_dim}, "
                                         f"expected start_dim=1, end_dim=-1")


def _pass_through(segment, name, module):
    if _acts_as(module, [nn.Flatten]):
        _check_flatten(name, module)
        if not segment.flat:  # a Flatten of flat features changes nothing
            segment.flat = segment.flatten_pending = True
        return
    if _acts_as(module, _NORMS):
        _enter_norm(segment, name, module)
    elif _acts_as(module, [nn.Hardtanh]):  # ReLU6 is one; any range holding 0 keeps zeros
        if not module.min_val <= 0 <= module.max_val:
            segment.zero = torch.zeros_like(segment.zero)
    elif _acts_as(module, _BREAKS_ZERO):
        segment.zero = torch.zeros_like(segment.zero)
    elif not _acts_as(module, _KEEPS_ZERO):
        _reject(name, module)


def _enter_norm(segment, name, norm):
    if isinstance(norm, nn.BatchNorm1d) != segment.flat:
        raise _not_a_chain(name, norm, f"does not match the {'flat' if segment.flat else 'image'} output of "
                                       f"{segment.name!r}")
    if segment.flatten_pending:
        segment.resolve_flatten(name, norm, norm.num_features)
    if norm.num_features != segment.units():
        raise _not_a_chain(name, norm, f"normalizes {norm.num_features} features, but {segment.name!r} gives "
                                       f"{segment.units()}")
    # Eval mode: w * normalized + b, an exact zero (for any input) where w and b are 0.
    zero = torch.zeros_like(segment.zero)
    if norm.affine:
        zero = (norm.weight.detach() == 0) & (norm.bias.detach() == 0)
    segment.zero = zero
    segment.norms.append((name, norm, segment.flat))


def _enter_layer(segment, name, layer):
    """Checks that ``layer`` reads ``segment``'s output as a chain does."""
    if isinstance(layer, nn.Linear):
        if segment.flatten_pending:
            segment.resolve_flatten(name, layer, layer.in_features)
        elif not segment.flat:
            raise _not_a_chain(name, layer, f"reads the images of {segment.name!r} without a Flatten in between")
    elif segment.flat:
        raise _not_a_chain(name, layer, f"convolves the flat output of {segment.name!r}")
    if _in_units(layer) != segment.units():
        raise _not_a_chain(name, layer, f"reads {_in_units(layer)} inputs, but {segment.name!r} gives "
                                        f"{segment.units()}")


def _apply(segment, name, layer):
    removable = segment.removable()
    kept_zeros = segment.pruned & ~removable
    grouped = [n for n, m in ((segment.name, segment.layer), (name, layer)) if getattr(m, "groups", 1) != 1]
    if grouped and removable.any():
        warnings.warn(f"export: {int(removable.sum())} pruned channels of {segment.name!r} kept: removing them "
                      f"would break the groups of {' and '.join(map(repr, grouped))}", stacklevel=4)
        return
    if kept_zeros.any():
        warnings.warn(f"export: {int(kept_zeros.sum())} pruned channels of {segment.name!r} kept: they are not zero "
                      f"where {name!r} reads them (a BatchNorm not linked to the layer's mask, or an "
                      f"activation with f(0) != 0, in between)", stacklevel=4)
    if not removable.any():
        return
    channels = (~removable).nonzero().flatten()
    features = (channels[:, None] * segment.block + torch.arange(segment.block, device=channels.device)).flatten()
    _keep_outputs(segment.layer, channels)
    for _, norm, in_features in segment.norms:
        _keep_norm_features(norm, features if in_features else channels)
    _keep_inputs(layer, features if isinstance(layer, nn.Linear) else channels)


def _parameter(tensor, like):
    return nn.Parameter(tensor.detach().clone(), requires_grad=like.requires_grad)


def _keep_outputs(layer, index):
    index = index.to(layer.weight.device)
    layer.weight = _parameter(layer.weight[index], layer.weight)
    if layer.bias is not None:
        layer.bias = _parameter(layer.bias[index], layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(index)
    else:
        layer.out_features = len(index)


def _keep_inputs(layer, index):
    index = index.to(layer.weight.device)
    layer.weight = _parameter(layer.weight[:, index], layer.weight)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = len(index)
    else:
        layer.in_features = len(index)


def _keep_norm_features(norm, index):
    reference = next(iter([*norm.parameters(), *norm.buffers()]), None)
    if reference is not None:
        index = index.to(reference.device)
    if norm.affine:
        norm.weight = _parameter(norm.weight[index], norm.weight)
        norm.bias = _parameter(norm.bias[index], norm.bias)
    if norm.track_running_stats:
        norm.running_mean = norm.running_mean[index].clone()
        norm.running_var = norm.running_var[index].clone()
    norm.num_features = len(index)
