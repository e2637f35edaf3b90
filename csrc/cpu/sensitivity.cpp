#include "cpu/sensitivity.h"

#include <cmath>

#include "cpu/isa.h"
#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace portable {
#include "cpu/sensitivity_kernels.inc"
}  // namespace portable

// The AVX2/FMA build of the same kernel where the CPU has it (kernels_avx2.h).
template <typename T>
void neuron_sensitivity(const T* weight, int64_t weight_row_stride, const T* grad_weight, int64_t grad_row_stride,
                        const T* bias, int64_t bias_stride, const T* grad_bias, int64_t grad_bias_stride,
                        int64_t rows, int64_t cols, T* sensitivity, T* taylor) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if (use_avx2())
    return avx2::neuron_sensitivity(weight, weight_row_stride, grad_weight, grad_row_stride, bias, bias_stride,
                                    grad_bias, grad_bias_stride, rows, cols, sensitivity, taylor);
#endif
  portable::neuron_sensitivity(weight, weight_row_stride, grad_weight, grad_row_stride, bias, bias_stride, grad_bias,
                               grad_bias_stride, rows, cols, sensitivity, taylor);
}

NEURONML_FAST_INSTANTIATE_SENSITIVITY(float)
NEURONML_FAST_INSTANTIATE_SENSITIVITY(double)

}  // namespace neuronml_fast::cpu
