"""Layers: drop-in masked twins of nn.Conv2d / nn.Linear, the NeuronGate, `convert`, and `export` back to torch.nn."""

from .export import export
from .masked import MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedConv2d, MaskedLinear, NeuronGate, convert
from .plastic import PlasticLinear, PlasticRNN

__all__ = ["MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedConv2d", "MaskedLinear", "NeuronGate", "PlasticLinear",
           "PlasticRNN", "convert", "export"]
