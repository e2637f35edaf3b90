// The AVX2 layout change of layout.h (float32); see kernels_avx2.h.
#include "cpu/kernels_avx2.h"
#include "cpu/transpose.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

void plane_to_channels_last(const float* plane, int64_t C, int64_t S, float* dst, int64_t pixel) {
  const int64_t c8 = C / 8 * 8;
  // Blocks of 8 pixels x 8 channels; a plane whose pixel count is not a multiple of 8 ends with a
  // block overlapping the previous one (written twice with the same values, by this thread: no
  // unaligned tail loop).
  for (int64_t p0 = 0; p0 < S; p0 += 8) {
    const int64_t p = p0 + 8 <= S ? p0 : S - 8;
    for (int64_t c0 = 0; c0 < c8; c0 += 8) transpose_block8(plane + c0 * S + p, S, dst + p * pixel + c0, pixel);
    for (int64_t q = p; q < p + 8; ++q)
      for (int64_t c = c8; c < C; ++c) dst[q * pixel + c] = plane[c * S + q];
  }
}

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
