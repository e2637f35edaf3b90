"""Differentiable-plasticity layers with Miconi-like defaults (SPEC section 4).

Each connection is ``weight + alpha * hebb``; ``hebb`` is per sequence and is returned, so it
(and the recurrent state) can be carried across calls: ``out, state = rnn(x, state)``.
"""

import math

import torch
from torch import nn

from ..ops.plastic import ACTIVATIONS, RULES, plastic_linear, plastic_rnn


def _plastic_parameters(module, out_features, in_features, alpha, eta, device, dtype):
    if alpha not in ("per_connection", "scalar"):
        raise ValueError(f"alpha: expected 'per_connection' or 'scalar', got {alpha!r}")
    if not 0.0 <= eta < 1.0:
        raise ValueError(f"eta: expected 0 <= eta < 1, got {eta!r}")
    factory = {"device": device, "dtype": dtype}
    # Miconi et al. (2018): small random weights and plasticity coefficients, eta learned from 0.01.
    module.weight = nn.Parameter(0.01 * torch.randn(out_features, in_features, **factory))
    shape = (out_features, in_features) if alpha == "per_connection" else ()
    module.alpha = nn.Parameter(0.01 * torch.randn(shape, **factory))
    module.eta = nn.Parameter(torch.tensor(float(eta), **factory))


def _check_options(rule, activation):
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


class PlasticLinear(nn.Module):
    """``y_t = act((weight + alpha * H_t) x_t + bias + drive_t)`` over a sequence ``[T, B, in]``.

    ``forward(input, hebb=None, drive=None) -> (output [T, B, out], hebb [B, out, in])``.
    """

    def __init__(self, in_features, out_features, bias=True, rule="hebb", activation="tanh",
                 alpha="per_connection", eta=0.01, device=None, dtype=None):
        super().__init__()
        _check_options(rule, activation)
        self.in_features, self.out_features, self.rule, self.activation = in_features, out_features, rule, activation
        _plastic_parameters(self, out_features, in_features, alpha, eta, device, dtype)
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)) \
            if bias else None

    def forward(self, input, hebb=None, drive=None):
        return plastic_linear(input, self.weight, self.alpha, self.eta, hebb, self.bias, drive, self.rule,
                              self.activation)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rule={self.rule!r}, activation={self.activation!r}"


class PlasticRNN(nn.Module):
    """Recurrent plastic layer: ``y_t = act((weight + alpha * H_t) y_{t-1} + input_t)``.

    ``forward(input [T, B, N], state=None, modulation=None) -> (output [T, B, N], (y_T, hebb))``;
    ``state`` is the ``(y, hebb)`` pair a previous call returned (zeros by default).
    """

    def __init__(self, size, rule="hebb", activation="tanh", alpha="per_connection", eta=0.01, clip=None,
                 device=None, dtype=None):
        super().__init__()
        _check_options(rule, activation)
        self.size, self.rule, self.activation, self.clip = size, rule, activation, clip
        _plastic_parameters(self, size, size, alpha, eta, device, dtype)

    def forward(self, input, state=None, modulation=None):
        y0, hebb = state if state is not None else (None, None)
        output, hebb = plastic_rnn(input, self.weight, self.alpha, self.eta, y0, hebb, modulation, self.clip,
                                   self.rule, self.activation)
        last = output[-1] if output.shape[0] else (y0 if y0 is not None else input.new_zeros(input.shape[1:]))
        return output, (last, hebb)

    def extra_repr(self):
        return f"{self.size}, rule={self.rule!r}, activation={self.activation!r}, clip={self.clip}"
