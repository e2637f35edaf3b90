"""Differentiable-plasticity layers with Miconi-like defaults (SPEC section 4).

Each connection is ``weight + alpha * hebb``; ``hebb`` is per sequence and is returned, so it
(and the recurrent state) can be carried across calls: ``out, state = rnn(x, state)``, in every
dtype (a 16-bit layer's trace is float32, the dtype it accumulates in, and is accepted back).

The trace's learning rate ``eta`` must lie in [0, 1) (the rules decay the trace by ``1 - eta``).
The layers learn it as ``eta = sigmoid(eta_logit)``, so no optimizer step can take it out of that
domain; ``layer.eta`` is the effective value and the state_dict stores ``eta_logit``.
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
    # eta = 0 is a fixed point of any smooth map onto [0, 1) (its gradient vanishes there): its
    # logit, -inf, is kept out of training, where weight decay would turn it into nan.
    module.eta_logit = nn.Parameter(torch.tensor(_logit(eta), **factory), requires_grad=eta > 0)


def _logit(eta):
    """The eta_logit whose sigmoid is ``eta`` (a number in [0, 1))."""
    return math.log(eta) - math.log1p(-eta) if eta > 0 else -math.inf


class _LearnedEta:
    """``eta = sigmoid(eta_logit)``: a trace learning rate in [0, 1) whatever the optimizer does."""

    @property
    def eta(self):
        """The effective eta, a 0-d tensor in [0, 1) that carries the gradient to ``eta_logit``."""
        eta = torch.sigmoid(self.eta_logit)
        # The sigmoid of a large logit rounds to exactly 1, outside the ops' domain: the largest
        # number below 1 of the dtype takes its place.
        return eta.clamp(max=1.0 - torch.finfo(eta.dtype).eps / 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict that stores eta itself (the effective value) loads as its logit.
        key = prefix + "eta"
        if key in state_dict and prefix + "eta_logit" not in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "eta_logit"] = _logit_of_loaded(state_dict.pop(key))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _logit_of_loaded(eta):
    value = float(eta)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"eta: expected 0 <= eta < 1 in the state_dict, got {value}")
    return torch.tensor(_logit(value), dtype=eta.dtype, device=eta.device)


def _check_options(rule, activation):
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


class PlasticLinear(_LearnedEta, nn.Module):
    """``y_t = act((weight + alpha * H_t) x_t + bias + drive_t)`` over a sequence ``[T, B, in]``.

    ``forward(input, hebb=None, drive=None) -> (output [T, B, out], hebb [B, out, in])``.

    The trace learning rate is learned as ``eta = sigmoid(eta_logit)``, so training can never take
    it out of the domain [0, 1) the rules require; the constructor's ``eta`` is its initial value.
    ``layer.eta`` reads the effective value; the parameter and state_dict entry is ``eta_logit``.
    ``eta=0`` keeps the layer at eta = 0 (``eta_logit`` is -inf and does not require grad).
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


MODULATORS = (None, "sequence", "neuron")


class PlasticRNN(_LearnedEta, nn.Module):
    """Recurrent plastic layer: ``y_t = act((weight + alpha * H_t) y_{t-1} + input_t)``.

    ``forward(input [T, B, N], state=None, modulation=None) -> (output [T, B, N], (y_T, hebb))``;
    ``state`` is the ``(y, hebb)`` pair a previous call returned (zeros by default).

    ``eta`` is learned as ``eta = sigmoid(eta_logit)``, always in [0, 1), as in `PlasticLinear`.

    ``modulator`` makes the neuromodulation endogenous (backpropamine, Miconi et al. 2019): a
    learned modulator neuron reads the new state each step, ``m_t = mod_act(mod_weight . y_t +
    mod_bias)``, and the trace follows ``H + M_t[j] post_j pre_i`` (eta unused):

    * ``"sequence"``: ``M_t = m_t`` for every neuron of a sequence;
    * ``"neuron"``: ``M_t[j] = mod_fanout[j] * m_t`` with a learned fan-out vector.

    The modulator's parameters start as ``nn.Linear``'s would (``mod_weight`` and ``mod_bias`` of a
    ``Linear(size, 1)``, ``mod_fanout`` of a ``Linear(1, size)``). Backpropamine clips the trace:
    pass ``clip`` (its code uses 1 or 2).
    """

    def __init__(self, size, rule="hebb", activation="tanh", alpha="per_connection", eta=0.01, clip=None,
                 modulator=None, mod_activation="tanh", device=None, dtype=None):
        super().__init__()
        _check_options(rule, activation)
        if modulator not in MODULATORS:
            raise ValueError(f"modulator: expected one of {MODULATORS}, got {modulator!r}")
        if mod_activation not in ACTIVATIONS:
            raise ValueError(f"mod_activation: expected one of {ACTIVATIONS}, got {mod_activation!r}")
        self.size, self.rule, self.activation, self.clip = size, rule, activation, clip
        self.modulator, self.mod_activation = modulator, mod_activation
        _plastic_parameters(self, size, size, alpha, eta, device, dtype)
        if modulator is not None:
            factory = {"device": device, "dtype": dtype}
            bound = 1 / math.sqrt(size) if size else 0.0
            self.mod_weight = nn.Parameter(torch.empty(size, **factory).uniform_(-bound, bound))
            self.mod_bias = nn.Parameter(torch.empty((), **factory).uniform_(-bound, bound))
        if modulator == "neuron":
            self.mod_fanout = nn.Parameter(torch.empty(size, **factory).uniform_(-1.0, 1.0))

    def forward(self, input, state=None, modulation=None):
        y0, hebb = state if state is not None else (None, None)
        endogenous = {}
        if self.modulator is not None:
            endogenous = dict(mod_weight=self.mod_weight, mod_bias=self.mod_bias, mod_activation=self.mod_activation,
                              mod_fanout=self.mod_fanout if self.modulator == "neuron" else None)
        output, hebb = plastic_rnn(input, self.weight, self.alpha, self.eta, y0, hebb, modulation, self.clip,
                                   self.rule, self.activation, **endogenous)
        last = output[-1] if output.shape[0] else (y0 if y0 is not None else input.new_zeros(input.shape[1:]))
        return output, (last, hebb)

    def extra_repr(self):
        extra = f", modulator={self.modulator!r}" if self.modulator is not None else ""
        return f"{self.size}, rule={self.rule!r}, activation={self.activation!r}, clip={self.clip}{extra}"
