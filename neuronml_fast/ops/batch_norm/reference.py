"""The oracle of the batch norm's double backward: the closed form in plain torch ops."""

import torch


def batch_norm_rows_double_backward_reference(u, u_gamma, u_beta, grad_out, input, weight, mean, invstd):
    """Gradients (w.r.t. grad_out, input, weight) of <u, dx> + <u_gamma, dweight> + <u_beta, dbias>,
    where (dx, dweight, dbias) is batch norm's backward of ``grad_out`` (``u*`` may be None: zero).

    Closed form (per channel, means over rows, r = invstd, x_hat = (x - mean) * r,
    P(v) = v - mean(v) - x_hat * mean(v * x_hat)):
        d grad_out = weight*r*P(u) + u_gamma*x_hat + u_beta
        d input    = -weight*r^2*(K*x_hat + m1*P(u) + mux*P(g)) + u_gamma*r*P(g)
        d weight   = r * R * K
    with g = grad_out, m1 = mean(g*x_hat), mux = mean(u*x_hat), K = mean(u*g) - mean(u)*mean(g) - mux*m1.
    """
    rows = input.shape[0]
    x_hat = (input - mean) * invstd
    g = grad_out
    zero = torch.zeros_like(weight)
    g_bar, m1 = g.mean(0), (g * x_hat).mean(0)
    if u is not None:
        u_bar, mux, mug = u.mean(0), (u * x_hat).mean(0), (u * g).mean(0)
    else:
        u_bar = mux = mug = zero
    u_gamma = zero if u_gamma is None else u_gamma
    u_beta = zero if u_beta is None else u_beta
    K = mug - u_bar * g_bar - mux * m1
    p_g = g - g_bar - x_hat * m1
    gr = weight * invstd
    d_input = -gr * invstd * (K * x_hat + mux * p_g) + u_gamma * invstd * p_g
    d_grad_out = u_gamma * x_hat + u_beta
    if u is not None:
        p_u = u - u_bar - x_hat * mux
        d_input = d_input - gr * invstd * m1 * p_u
        d_grad_out = d_grad_out + gr * p_u
    return d_grad_out.expand_as(g), d_input, invstd * rows * K
