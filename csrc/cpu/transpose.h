// 8 x 8 float transposes in AVX2 registers, shared by the kernels that change layouts
// (channels-first <-> channels-last). Framework-free. Compiled for AVX2 whatever the
// translation unit's flags (avx2_target.h): include it only from *_avx2.cpp files, after their
// other headers, and call it only from their AVX2 code.
#pragma once
#include <cstdint>

#include "cpu/avx2_target.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

// In-register transpose of 8 rows of 8 floats: r[k][j] becomes r[j][k].
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}

// dst[j * dst_step + k] = src[k * src_step + j] for j, k < 8.
inline void transpose_block8(const float* src, int64_t src_step, float* dst, int64_t dst_step) {
  __m256 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * src_step);
  transpose8x8(r);
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + k * dst_step, r[k]);
}

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
