"""C++ CPU launchers of the plastic layers (SPEC section 4): allocation around the fused
time-stepping kernels of csrc/cpu/plastic.cpp, which run the whole time loop."""

from ... import _alloc, _extensions
from .op import dense_grads, modulator_grads, recomputes
from .rules import MODULATED, RULE_CODES


def _rule_code(rule, modulation, modulator=None):
    return MODULATED if modulation is not None or modulator is not None else RULE_CODES[rule]


def _contiguous(t):
    return None if t is None else t.contiguous()


def _modulator_args(modulator):
    """(mod_weight, mod_bias, mod_fanout, mod_tanh) for the extension; a CPU read of the 0-d bias."""
    if modulator is None:
        return None, 0.0, None, True
    bias = 0.0 if modulator.bias is None else float(modulator.bias.detach())
    return _contiguous(modulator.weight), bias, _contiguous(modulator.fanout_or_ones()), modulator.tanh


def plastic_forward(x, weight, alpha, eta, hebb, bias, drive, y0, modulation, clip, recurrent, rule, activation,
                    every, modulator=None):
    T, B = x.shape[:2]
    out_features, in_features = weight.shape
    trace = _alloc.empty((B, out_features, in_features), dtype=x.dtype, device=x.device)
    if hebb is None:
        trace.zero_()
    else:
        trace.copy_(hebb)
    output = _alloc.empty((T, B, out_features), dtype=x.dtype, device=x.device)
    checkpoints = _alloc.empty((-(-T // every), B, out_features, in_features), dtype=x.dtype, device=x.device)
    activity = None if modulator is None else _alloc.empty((T, B), dtype=x.dtype, device=x.device)
    c = _contiguous
    _extensions.cpu().plastic_forward_out(
        c(x), c(weight), c(alpha), float(eta.detach()), c(bias), c(drive), c(y0), c(modulation), clip, recurrent,
        _rule_code(rule, modulation, modulator), activation == "tanh", every, trace, output, checkpoints,
        *_modulator_args(modulator), activity)
    return output, trace, checkpoints, activity, None  # float32 and float64 only: the output is the state


def plastic_backward(grad_output, grad_hebb, x, weight, alpha, eta, y0, modulation, output, hebb_final, checkpoints,
                     clip, recurrent, rule, activation, every, modulator=None, activity=None):
    """`op.py`'s plastic_backward contract."""
    if modulator is not None:  # the modulated rule's backward with the M_t the modulator produced
        modulation = modulator.modulation(activity)
    T, B = x.shape[:2]
    out_features, in_features = weight.shape
    dtype = x.dtype
    new = lambda *shape: _alloc.empty(shape, dtype=dtype, device=x.device)  # noqa: E731
    # Pooled: a fresh [B, out, in] buffer per call pays its page faults on first touch.
    trace = new(B, out_features, in_features).copy_(hebb_final.detach())  # walked back to the initial trace
    grad_trace = (_alloc.zeros((B, out_features, in_features), dtype=dtype, device=x.device) if grad_hebb is None
                  else new(B, out_features, in_features).copy_(grad_hebb.detach()))
    grad_z = new(T, B, out_features)
    grad_pre = None if recurrent else new(T, B, in_features)
    grad_y0 = new(B, out_features) if recurrent else None
    grad_alpha = new(*(weight.shape if alpha.dim() else (1,)))
    grad_eta = new(1)
    grad_mod = None if modulation is None else new(*modulation.shape)
    segment = new(every, B, out_features, in_features) if recomputes(clip, activation) else None
    grad_s = None if modulator is None else new(T, B)
    mod_weight, _, mod_fanout, mod_tanh = _modulator_args(modulator)
    c = _contiguous
    _extensions.cpu().plastic_backward_out(
        c(x), c(weight), c(alpha), float(eta.detach()), c(y0), c(modulation), clip, recurrent,
        _rule_code(rule, modulation), activation == "tanh", every, c(output), c(grad_output), c(checkpoints), trace,
        grad_trace, grad_z, grad_pre, grad_y0, grad_alpha, grad_eta, grad_mod, segment, mod_weight, mod_fanout,
        mod_tanh, c(activity), grad_s)
    grad_input, grad_weight, grad_bias, grad_drive = dense_grads(x, y0, output, grad_z, grad_pre, recurrent)
    modulator_grad = (None,) * 3 if modulator is None else modulator_grads(grad_s, grad_mod, output, activity,
                                                                            x.dtype)
    return (grad_input, grad_weight, grad_alpha.view(alpha.shape), grad_eta.view(()), grad_trace, grad_bias,
            grad_drive, grad_y0, None if modulator is not None else grad_mod, *modulator_grad)
