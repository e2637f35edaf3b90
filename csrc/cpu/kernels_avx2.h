// The AVX2/FMA kernels of the CPU backend: compiled for that target (avx2_target.h) in
// *_avx2.cpp, called by the portable entry points of masked.h, layout.h, conv_grad.h, plastic.h,
// sensitivity.h and batch_norm.h only where use_avx2() (isa.h). Framework-free; the masked, layout
// and conv-gradient kernels are float32 only.
#pragma once
#include <cstdint>

#include "cpu/avx2_target.h"
#include "cpu/batch_norm.h"
#include "cpu/conv_grad.h"
#include "cpu/masked.h"
#include "cpu/plastic.h"
#include "cpu/sensitivity.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

// masked.h, for C % 8 == 0; channels-first full tensors need full_s == 1 and S >= 8.
void masked_forward_epilogue(const MaskedLayout& L, const float* y, const int64_t* slot, const float* mask,
                             const float* bias, float* out, float* pre);
void masked_backward_prologue(const MaskedLayout& L, const float* grad_out, const float* grad_pre, const float* pre,
                              const int64_t* slot, const float* mask, float* gy, float* grad_bias, float* grad_mask);

// layout.h: one (task, image) plane [C, S] into dst[p * pixel + c], for S >= 8.
void plane_to_channels_last(const float* plane, int64_t C, int64_t S, float* dst, int64_t pixel);

// conv_grad.h.
void conv2d_weight_grad_nhwc(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t x_task,
                             const float* gy, const float* x, float* gw);
void conv2d_input_grad(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t w_task,
                       const InputGradLayout& gx_layout, const float* gy, const float* w, float* gx);

// plastic.h (float and double; plastic_kernels.inc).
template <typename T>
void plastic_forward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* bias,
                     const T* drive, const T* y0, const T* modulation, const Modulator<T>& modulator, T* hebb,
                     T* output, T* checkpoints);
template <typename T>
void plastic_backward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* y0,
                      const T* modulation, const Modulator<T>& modulator, const T* output, const T* grad_output,
                      const T* checkpoints, T* hebb, T* grad_hebb, T* grad_z, T* grad_pre, T* grad_y0,
                      T* grad_alpha, T* grad_eta, T* grad_modulation, T* segment);

// sensitivity.h and batch_norm.h (float and double; *_kernels.inc).
template <typename T>
void neuron_sensitivity(const T* weight, int64_t weight_row_stride, const T* grad_weight, int64_t grad_row_stride,
                        const T* bias, int64_t bias_stride, const T* grad_bias, int64_t grad_bias_stride,
                        int64_t rows, int64_t cols, T* sensitivity, T* taylor);
template <typename T>
void batch_norm_rows_double_backward(int64_t R, int64_t C, const T* u, const T* u_gamma, const T* u_beta,
                                     const T* g, const T* x, const T* gamma, const T* mean, const T* invstd,
                                     T* grad_g, T* grad_x, T* grad_gamma);

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
