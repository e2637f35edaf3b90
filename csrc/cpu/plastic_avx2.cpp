// The AVX2/FMA build of the plastic kernels: plastic_kernels.inc compiled for that target
// (avx2_target.h); plastic.cpp calls it only where use_avx2().
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

#include "cpu/plastic_kernels.inc"

NEURONML_FAST_INSTANTIATE_PLASTIC(float)
NEURONML_FAST_INSTANTIATE_PLASTIC(double)

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
