#include "cpu/plastic.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace portable {
#include "cpu/plastic_kernels.inc"
}  // namespace portable

// The AVX2/FMA build of the same kernels where the CPU has it (kernels_avx2.h).
template <typename T>
void plastic_forward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* bias,
                     const T* drive, const T* y0, const T* modulation, const Modulator<T>& modulator, T* hebb,
                     T* output, T* checkpoints) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if (use_avx2())
    return avx2::plastic_forward(s, x, weight, alpha, eta, bias, drive, y0, modulation, modulator, hebb, output,
                                 checkpoints);
#endif
  portable::plastic_forward(s, x, weight, alpha, eta, bias, drive, y0, modulation, modulator, hebb, output,
                            checkpoints);
}

template <typename T>
void plastic_backward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* y0,
                      const T* modulation, const Modulator<T>& modulator, const T* output, const T* grad_output,
                      const T* checkpoints, T* hebb, T* grad_hebb, T* grad_z, T* grad_pre, T* grad_y0,
                      T* grad_alpha, T* grad_eta, T* grad_modulation, T* segment) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if (use_avx2())
    return avx2::plastic_backward(s, x, weight, alpha, eta, y0, modulation, modulator, output, grad_output,
                                  checkpoints, hebb, grad_hebb, grad_z, grad_pre, grad_y0, grad_alpha, grad_eta,
                                  grad_modulation, segment);
#endif
  portable::plastic_backward(s, x, weight, alpha, eta, y0, modulation, modulator, output, grad_output, checkpoints,
                             hebb, grad_hebb, grad_z, grad_pre, grad_y0, grad_alpha, grad_eta, grad_modulation,
                             segment);
}

NEURONML_FAST_INSTANTIATE_PLASTIC(float)
NEURONML_FAST_INSTANTIATE_PLASTIC(double)

}  // namespace neuronml_fast::cpu
