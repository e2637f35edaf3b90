// The AVX2/FMA build of the per-neuron sensitivity kernel: sensitivity_kernels.inc compiled for
// that target (avx2_target.h); sensitivity.cpp calls it only where use_avx2().
#include <cmath>

#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

#include "cpu/sensitivity_kernels.inc"

NEURONML_FAST_INSTANTIATE_SENSITIVITY(float)
NEURONML_FAST_INSTANTIATE_SENSITIVITY(double)

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
