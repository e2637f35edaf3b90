"""The oracle of the per-neuron Taylor sensitivity: plain eager PyTorch."""

from ... import _alloc


def neuron_sensitivity_reference(weight, grad_weight, bias=None, grad_bias=None):
    """Plain eager PyTorch: the oracle every backend is tested against."""
    acc = _alloc.accumulation_dtype(weight.dtype)
    taylor = (weight.to(acc) * grad_weight.to(acc)).flatten(1).sum(1)
    if bias is not None:
        taylor = taylor + bias.to(acc) * grad_bias.to(acc)
    return taylor.abs()
