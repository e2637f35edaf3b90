"""Layers: drop-in masked twins of nn.Conv2d / nn.Linear, the NeuronGate, and `convert`."""

from .masked import MaskedBatchNorm2d, MaskedConv2d, MaskedLinear, NeuronGate, convert
from .plastic import PlasticLinear, PlasticRNN

__all__ = ["MaskedBatchNorm2d", "MaskedConv2d", "MaskedLinear", "NeuronGate", "PlasticLinear", "PlasticRNN", "convert"]
