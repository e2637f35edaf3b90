// Double backward of batch normalization with batch statistics, over the rows of a [R, C]
// matrix (channels contiguous: the CPU backend's grouped-NHWC activations are such a matrix).
// Framework-free.
//
// MAML's second order differentiates the inner step's BN backward. Autograd composes that
// derivative from ~25 full-size elementwise ops and reductions; here it is two passes over
// memory. With x_hat = (x - mean) * invstd, and g the upstream gradient of BN's output, the
// backward is  dx = gamma*invstd*(g - mean(g) - x_hat*mean(g*x_hat)),  dgamma = sum(g*x_hat),
// dbeta = sum(g).  Given the gradients u, u_gamma, u_beta of a loss with respect to (dx, dgamma,
// dbeta), this returns its gradients with respect to g, x and gamma (the dependence of mean and
// invstd on x included). Derivation and per-channel coefficients: batch_norm.cpp.
#pragma once
#include <cstdint>

namespace neuronml_fast::cpu {

// u, u_gamma, u_beta: nullable (a zero gradient). grad_g, grad_x: [R, C]; grad_gamma: [C].
// Every pointer to a [R, C] matrix has row stride C.
template <typename T>
void batch_norm_rows_double_backward(int64_t R, int64_t C, const T* u, const T* u_gamma, const T* u_beta,
                                     const T* g, const T* x, const T* gamma, const T* mean, const T* invstd,
                                     T* grad_g, T* grad_x, T* grad_gamma);

}  // namespace neuronml_fast::cpu

// Explicit instantiation for T, in the namespace where it is expanded (batch_norm.cpp: the
// dispatching entry point; batch_norm_avx2.cpp: the AVX2 build).
#define NEURONML_FAST_INSTANTIATE_BATCH_NORM(T)                                                               \
  template void batch_norm_rows_double_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*,     \
                                                   const T*, const T*, const T*, const T*, T*, T*, T*);
