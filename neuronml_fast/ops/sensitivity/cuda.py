"""The CUDA C++ launcher of the per-neuron sensitivity (csrc/cuda/sensitivity.cu)."""

from ... import _extensions
from .op import new_outputs


def neuron_sensitivity(weight, grad_weight, bias, grad_bias):
    sensitivity, taylor = new_outputs(weight)
    _extensions.cuda().neuron_sensitivity_out(weight, grad_weight, bias, grad_bias, sensitivity, taylor)
    return sensitivity, taylor
