// The AVX2/FMA build of the batch-norm double backward kernel: batch_norm_kernels.inc compiled for
// that target (avx2_target.h); batch_norm.cpp calls it only where use_avx2().
#include <algorithm>
#include <vector>

#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

#include "cpu/batch_norm_kernels.inc"

NEURONML_FAST_INSTANTIATE_BATCH_NORM(float)
NEURONML_FAST_INSTANTIATE_BATCH_NORM(double)

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
