"""The oracle of the plastic layers: plain eager PyTorch, step by step. Eager autograd keeps one
trace per step: O(T * B * N^2) memory."""

import torch

from ... import _alloc


def _activation(z, activation):
    return torch.tanh(z) if activation == "tanh" else z


def _rule(hebb, pre, post, eta, rule, modulation=None, clip=None):
    """One trace update. hebb [B, out, in], pre [B, in], post [B, out], modulation [B] or [B, out]."""
    outer = post[:, :, None] * pre[:, None, :]
    if modulation is not None:
        m = modulation[:, None, None] if modulation.dim() == 1 else modulation[:, :, None]
        hebb = hebb + m * outer
    elif rule == "hebb":
        hebb = (1 - eta) * hebb + eta * outer
    else:
        hebb = hebb + eta * post[:, :, None] * (pre[:, None, :] - post[:, :, None] * hebb)
    if clip is not None:
        hebb = hebb.clamp(-clip, clip)
    return hebb


def _upcast(dtype, *tensors):
    return [None if t is None else t.to(dtype) if torch.is_tensor(t) else t for t in tensors]


def plastic_linear_reference(input, weight, alpha, eta, hebb=None, bias=None, drive=None, rule="hebb",
                             activation="tanh"):
    """Plain eager PyTorch, step by step: the oracle. Returns (output [T, B, out], hebb [B, out, in])."""
    acc = _alloc.accumulation_dtype(input.dtype)
    T, B = input.shape[:2]
    out_features, in_features = weight.shape
    x, weight, alpha, eta, hebb, bias, drive = _upcast(acc, input, weight, alpha, eta, hebb, bias, drive)
    trace = x.new_zeros((B, out_features, in_features)) if hebb is None else hebb
    outputs = []
    for t in range(T):
        z = torch.einsum("boi,bi->bo", weight + alpha * trace, x[t])
        if bias is not None:
            z = z + bias
        if drive is not None:
            z = z + drive[t]
        y = _activation(z, activation)
        outputs.append(y)
        trace = _rule(trace, x[t], y, eta, rule)
    output = torch.stack(outputs) if outputs else x.new_zeros((0, B, out_features))
    return output.to(input.dtype), trace


def endogenous_modulation(y, mod_weight, mod_bias=None, mod_fanout=None, mod_activation="tanh"):
    """Backpropamine's modulator: ``M[b, j] = mod_fanout[j] * mod_act(mod_weight . y[b] + mod_bias)``.

    ``y [B, N]`` -> ``[B, N]``, one value per postsynaptic neuron from one modulator neuron."""
    s = y @ mod_weight
    if mod_bias is not None:
        s = s + mod_bias
    m = _activation(s, mod_activation)[:, None]
    return m if mod_fanout is None else m * mod_fanout


def plastic_rnn_reference(input, weight, alpha, eta, y0=None, hebb=None, modulation=None, clip=None, rule="hebb",
                          activation="tanh", mod_weight=None, mod_bias=None, mod_fanout=None, mod_activation="tanh"):
    """Plain eager PyTorch, step by step: the oracle. Returns (output [T, B, N], hebb [B, N, N])."""
    acc = _alloc.accumulation_dtype(input.dtype)
    T, B, N = input.shape
    x, weight, alpha, eta, y0, hebb, modulation, mod_weight, mod_bias, mod_fanout = _upcast(
        acc, input, weight, alpha, eta, y0, hebb, modulation, mod_weight, mod_bias, mod_fanout)
    trace = x.new_zeros((B, N, N)) if hebb is None else hebb
    y = x.new_zeros((B, N)) if y0 is None else y0
    outputs = []
    for t in range(T):
        y_new = _activation(torch.einsum("bji,bi->bj", weight + alpha * trace, y) + x[t], activation)
        if mod_weight is not None:
            m = endogenous_modulation(y_new, mod_weight, mod_bias, mod_fanout, mod_activation)
        else:
            m = None if modulation is None else modulation[t]
        trace = _rule(trace, y, y_new, eta, rule, m, clip)
        outputs.append(y_new)
        y = y_new
    output = torch.stack(outputs) if outputs else x.new_zeros((0, B, N))
    return output.to(input.dtype), trace
