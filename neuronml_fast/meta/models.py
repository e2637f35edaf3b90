"""Meta-learning models built from the masked layers: MAML's Conv4 (Omniglot) and MLP (sinusoids).

Each model is an ordinary ``nn.Module`` (``model(x)`` runs one task with its own parameters)
and also a *functional* model for meta-learning: ``model.functional(params, x, masks, batched)``
runs with the given (adapted) parameters instead of its own.

* ``batched=True`` ("fused" backend): every tensor has a leading task dimension ``T``
  (``x [T, N, ...]``, every parameter ``[T, ...]``, masks ``[T, C]``) and the layers are our
  task-batched ops: one ``nf.masked_conv2d`` / ``nf.masked_linear`` call per layer for all tasks.
* ``batched=False`` ("reference" backend): one task in plain PyTorch (``F.conv2d(...) * mask``),
  the way learn2learn and higher run MAML, tasks in a Python loop outside.

Structure masks (NeuronML): ``masks[i]`` gates the neurons of structured layer ``i`` (the conv
channels of Conv4, the hidden units of the MLP). The layer's kernel gets the mask's hard 0/1
value (pruned neurons are skipped); the mask itself multiplies the output *after* the
normalization (a mask before BatchNorm would be normalized away), so pruned neurons are exact
zeros through conv -> BN -> ReLU and the mask's gradient is the straight-through one.
"""

import torch.nn.functional as F
from torch import nn

from ..nn.masked import MaskedConv2d, MaskedLinear
from ..ops.batch_norm import batch_norm_rows
from ..ops.masked import masked_conv2d, masked_linear


def task_batch_norm(h, weight, bias, eps=1e-5):
    """Per-task batch norm with batch statistics (MAML's transductive BN, no running stats).

    ``h [T, N, C, H, W]``, ``weight``/``bias [T, C]``. The tasks are folded into the channels
    of one batch norm. For the CPU backend's grouped-NHWC activations (stored as
    ``[N, H, W, T, C]``) the fold is the matrix view ``[N*H*W, T*C]``: nothing is copied, and
    `neuronml_fast.ops.batch_norm.batch_norm_rows` runs BN's double backward (MAML's second order) as one
    fused kernel over that matrix. Autograd's own BN double backward on the 4-d channels-last view
    mixes layouts and reduces with ``sum(0)`` over strided memory: about 4x slower (5 images x 2048
    channels x 14x14).
    """
    T, N, C = h.shape[:3]
    spatial = h.shape[3:]
    rows_first = h.permute(1, *range(3, h.dim()), 0, 2)  # [N, *spatial, T, C]
    weight, bias = weight.reshape(T * C), bias.reshape(T * C)
    if rows_first.is_contiguous():
        out = batch_norm_rows(rows_first.reshape(-1, T * C), weight, bias, eps)
        return out.view(rows_first.shape).permute(h.dim() - 2, 0, h.dim() - 1, *range(1, h.dim() - 2))
    folded = h.transpose(0, 1).reshape(N, T * C, *spatial)
    out = F.batch_norm(folded, None, None, weight, bias, training=True, eps=eps)
    return out.reshape(N, T, C, *spatial).transpose(0, 1)


def _channel_gate(h, mask, channel_dim):
    shape = [1] * h.dim()
    shape[channel_dim] = mask.shape[-1]
    if mask.dim() == 2:  # [T, C] on [T, N, C, ...]
        shape[0] = mask.shape[0]
    return h * mask.reshape(shape)


def hard(mask):
    """The 0/1 pattern the kernels skip by (no gradient)."""
    return (mask.detach() != 0).to(mask.dtype)


class Conv4(nn.Module):
    """MAML's Omniglot / miniImageNet network: ``layers`` x [3x3 conv, BN, ReLU, downsample], linear head.

    ``downsample="stride"`` (Finn et al.'s Omniglot model: stride-2 convs, features averaged
    over the remaining 2x2) or ``"pool"`` (stride-1 convs and 2x2 max-pooling, flattened).
    BatchNorm always uses the statistics of the current batch (as in MAML; there are no running
    statistics to leak across tasks).
    """

    def __init__(self, ways, in_channels=1, hidden=64, layers=4, image_size=28, downsample="stride"):
        super().__init__()
        if downsample not in ("stride", "pool"):
            raise ValueError(f"downsample: expected 'stride' or 'pool', got {downsample!r}")
        if ways < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"ways, hidden, layers: expected positive ints, got {ways}, {hidden}, {layers}")
        self.downsample, self.ways = downsample, ways
        self.stride = 2 if downsample == "stride" else 1
        channels = [in_channels] + [hidden] * layers
        self.convs = nn.ModuleList(MaskedConv2d(channels[i], channels[i + 1], 3, stride=self.stride, padding=1)
                                   for i in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm2d(hidden, track_running_stats=False) for _ in range(layers))
        size = image_size
        for _ in range(layers):
            size = (size + 1) // 2 if downsample == "stride" else size // 2
        if size < 1:
            raise ValueError(f"image_size: {image_size} is too small for {layers} downsampling layers")
        self.features = hidden if downsample == "stride" else hidden * size * size
        self.head = MaskedLinear(self.features, ways)
        for conv in self.convs:  # MAML's initialization: Xavier-uniform-like conv weights, zero biases
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def structure(self):
        """Per structured layer: (neurons, the parameters whose Taylor importance is the neuron's).

        After BatchNorm a conv channel's own weights are scale invariant (their Taylor term
        w . dL/dw is ~0), so a channel's importance is taken at the BN affine parameters: zeroing
        gamma and beta removes the neuron exactly.
        """
        return [(norm.num_features, (f"norms.{i}.weight", f"norms.{i}.bias")) for i, norm in enumerate(self.norms)]

    def forward(self, x, masks=None):
        """One task with the module's own parameters: ``x [N, C, H, W]`` -> logits ``[N, ways]``."""
        return self.functional(dict(self.named_parameters()), x, masks, batched=False)

    def embed(self, params, x, masks=None, batched=False):
        h = x
        for i in range(len(self.convs)):
            h = self._block(params, i, h, None if masks is None else masks[i], batched)
        if self.downsample == "stride":
            return h.mean((-2, -1))
        return h.flatten(-3)

    def functional(self, params, x, masks=None, batched=False):
        features = self.embed(params, x, masks, batched)
        return _linear(features, params["head.weight"], params["head.bias"], batched)

    def _block(self, params, i, h, mask, batched):
        w, b = params[f"convs.{i}.weight"], params[f"convs.{i}.bias"]
        gamma, beta = params[f"norms.{i}.weight"], params[f"norms.{i}.bias"]
        if batched:
            keep = hard(mask) if mask is not None else h.new_ones(w.shape[:2])
            h = masked_conv2d(h, w, keep, b, self.stride, 1)
            h = task_batch_norm(h, gamma, beta)
            channel_dim = 2
        else:
            h = F.conv2d(h, w, b, self.stride, 1)
            if mask is not None:
                h = _channel_gate(h, hard(mask), 1)
            h = F.batch_norm(h, None, None, gamma, beta, training=True)
            channel_dim = 1
        if mask is not None:
            h = _channel_gate(h, mask, channel_dim)
        h = F.relu(h)
        if self.downsample == "pool":
            h = F.max_pool2d(h.flatten(0, 1), 2).unflatten(0, h.shape[:2]) if batched else F.max_pool2d(h, 2)
        return h


def _linear(x, weight, bias, batched, mask=None):
    if batched:
        keep = hard(mask) if mask is not None else x.new_ones(weight.shape[:2])
        return masked_linear(x, weight, keep, bias)
    out = F.linear(x, weight, bias)
    return out if mask is None else _channel_gate(out, hard(mask), -1)


class MLP(nn.Module):
    """Finn et al.'s sinusoid regressor: 1 -> 40 -> 40 -> 1 with ReLU; hidden units are the neurons."""

    def __init__(self, in_features=1, hidden=(40, 40), out_features=1):
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(MaskedLinear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1))

    @property
    def structure(self):
        return [(layer.out_features, (f"layers.{i}.weight", f"layers.{i}.bias"))
                for i, layer in enumerate(self.layers[:-1])]

    def forward(self, x, masks=None):
        return self.functional(dict(self.named_parameters()), x, masks, batched=False)

    def functional(self, params, x, masks=None, batched=False):
        h = x
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            mask = None if (masks is None or i == last) else masks[i]
            h = _linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"], batched, mask)
            if mask is not None:
                h = _channel_gate(h, mask, -1)
            if i < last:
                h = F.relu(h)
        return h

