"""The C++ CPU launcher of the batch norm's double backward (csrc/cpu/batch_norm.cpp)."""

from ... import _alloc, _extensions


def _contiguous(t):
    return None if t is None else t.contiguous()


def batch_norm_rows_double_backward(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd):
    """(d grad_out, d input, d weight); see `reference.batch_norm_rows_double_backward_reference`."""
    new = lambda shape: _alloc.empty(shape, dtype=input.dtype, device=input.device)  # noqa: E731
    d_grad_out, d_input, d_weight = new(input.shape), new(input.shape), new(weight.shape)
    c = _contiguous
    _extensions.cpu().batch_norm_rows_double_backward_out(c(u), c(u_gamma), c(u_beta), c(grad_out), c(input),
                                                          c(weight), c(mean), c(invstd), d_grad_out, d_input,
                                                          d_weight)
    return d_grad_out, d_input, d_weight
