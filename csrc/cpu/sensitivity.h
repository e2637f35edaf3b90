// Per-neuron first-order Taylor sensitivity on the CPU (SPEC section 3).
// Framework-free: raw pointers and sizes only; bindings/sensitivity.cpp validates tensors and calls in.
#pragma once
#include <cstdint>

namespace neuronml_fast::cpu {

// For each row c of a [rows, cols] weight (inner dimension contiguous):
//   taylor[c]      = sum_k weight[c, k] * grad_weight[c, k] + bias[c] * grad_bias[c]
//   sensitivity[c] = |taylor[c]|
// bias / grad_bias may be null (no bias term). Accumulates in T (float or double), as the
// SPEC asks: float32 reductions for float32 input, float64 for float64.
template <typename T>
void neuron_sensitivity(const T* weight, int64_t weight_row_stride,
                        const T* grad_weight, int64_t grad_row_stride,
                        const T* bias, int64_t bias_stride,
                        const T* grad_bias, int64_t grad_bias_stride,
                        int64_t rows, int64_t cols,
                        T* sensitivity, T* taylor);

}  // namespace neuronml_fast::cpu

// Explicit instantiation for T, in the namespace where it is expanded (sensitivity.cpp: the
// dispatching entry point; sensitivity_avx2.cpp: the AVX2 build).
#define NEURONML_FAST_INSTANTIATE_SENSITIVITY(T)                                                              \
  template void neuron_sensitivity<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, const T*, int64_t, \
                                      int64_t, int64_t, T*, T*);
