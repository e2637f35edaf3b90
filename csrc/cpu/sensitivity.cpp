#include "cpu/sensitivity.h"

#include <cmath>

namespace neuronml_fast::cpu {

namespace {

// Below this much work a parallel region costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

template <typename T>
T row_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  // Several independent partial sums let the compiler vectorize the reduction
  // (omp simd permits the reassociation) and keep float32 rounding error small.
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

}  // namespace

template <typename T>
void neuron_sensitivity(const T* weight, int64_t weight_row_stride,
                        const T* grad_weight, int64_t grad_row_stride,
                        const T* bias, int64_t bias_stride,
                        const T* grad_bias, int64_t grad_bias_stride,
                        int64_t rows, int64_t cols,
                        T* sensitivity, T* taylor) {
  const bool parallel = rows > 1 && rows * cols >= kParallelGrain;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < rows; ++c) {
    T r = row_dot(weight + c * weight_row_stride, grad_weight + c * grad_row_stride, cols);
    if (bias != nullptr) r += bias[c * bias_stride] * grad_bias[c * grad_bias_stride];
    taylor[c] = r;
    sensitivity[c] = std::abs(r);
  }
}

template void neuron_sensitivity<float>(const float*, int64_t, const float*, int64_t, const float*, int64_t,
                                        const float*, int64_t, int64_t, int64_t, float*, float*);
template void neuron_sensitivity<double>(const double*, int64_t, const double*, int64_t, const double*, int64_t,
                                         const double*, int64_t, int64_t, int64_t, double*, double*);

}  // namespace neuronml_fast::cpu
