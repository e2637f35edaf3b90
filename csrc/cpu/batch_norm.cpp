#include "cpu/batch_norm.h"

#include <algorithm>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace portable {
#include "cpu/batch_norm_kernels.inc"
}  // namespace portable

// The AVX2/FMA build of the same kernel where the CPU has it (kernels_avx2.h).
template <typename T>
void batch_norm_rows_double_backward(int64_t R, int64_t C, const T* u, const T* u_gamma, const T* u_beta,
                                     const T* g, const T* x, const T* gamma, const T* mean, const T* invstd,
                                     T* grad_g, T* grad_x, T* grad_gamma) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if (use_avx2())
    return avx2::batch_norm_rows_double_backward(R, C, u, u_gamma, u_beta, g, x, gamma, mean, invstd, grad_g,
                                                 grad_x, grad_gamma);
#endif
  portable::batch_norm_rows_double_backward(R, C, u, u_gamma, u_beta, g, x, gamma, mean, invstd, grad_g, grad_x,
                                            grad_gamma);
}

NEURONML_FAST_INSTANTIATE_BATCH_NORM(float)
NEURONML_FAST_INSTANTIATE_BATCH_NORM(double)

}  // namespace neuronml_fast::cpu
