#include "cpu/conv_grad.h"

#include "cpu/isa.h"
#include "cpu/kernels_avx2.h"

namespace neuronml_fast::cpu {

bool conv2d_grad_available() { return NEURONML_FAST_HAS_AVX2_TARGET && use_avx2(); }

#if NEURONML_FAST_HAS_AVX2_TARGET
void conv2d_weight_grad_nhwc(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t x_task,
                             const float* gy, const float* x, float* gw) {
  if (conv2d_grad_available()) avx2::conv2d_weight_grad_nhwc(s, tasks, gy_task, x_task, gy, x, gw);
}

void conv2d_input_grad(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t w_task,
                       const InputGradLayout& gx_layout, const float* gy, const float* w, float* gx) {
  if (conv2d_grad_available()) avx2::conv2d_input_grad(s, tasks, gy_task, w_task, gx_layout, gy, w, gx);
}
#else
void conv2d_weight_grad_nhwc(const ConvGradShape&, int64_t, int64_t, int64_t, const float*, const float*, float*) {}
void conv2d_input_grad(const ConvGradShape&, int64_t, int64_t, int64_t, const InputGradLayout&, const float*,
                       const float*, float*) {}
#endif

}  // namespace neuronml_fast::cpu
