#include "cpu/layout.h"

#include "cpu/parallel.h"
#include "cpu/transpose.h"

namespace neuronml_fast::cpu {

namespace {

// Pixels [p0, p1) and channels [c0, C) of one (task, image) plane, one element at a time.
template <typename T>
void copy_scalar(const T* plane, int64_t C, int64_t S, int64_t p0, int64_t p1, int64_t c0, T* dst, int64_t pixel) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = c0; c < C; ++c) dst[p * pixel + c] = plane[c * S + p];
}

// One (task, image) plane [C, S] into dst[p * pixel + c].
template <typename T>
void plane_to_channels_last(const T* plane, int64_t C, int64_t S, T* dst, int64_t pixel) {
#if defined(__AVX2__)
  if constexpr (sizeof(T) == 4) {
    if (S >= 8) {
      const int64_t c8 = C / 8 * 8;
      // Blocks of 8 pixels x 8 channels; a plane whose pixel count is not a multiple of 8 ends
      // with a block overlapping the previous one (written twice with the same values, by this
      // thread: no unaligned tail loop).
      for (int64_t p0 = 0; p0 < S; p0 += 8) {
        const int64_t p = p0 + 8 <= S ? p0 : S - 8;
        for (int64_t c0 = 0; c0 < c8; c0 += 8)
          transpose_block8(reinterpret_cast<const float*>(plane) + c0 * S + p, S,
                           reinterpret_cast<float*>(dst) + p * pixel + c0, pixel);
        copy_scalar(plane, C, S, p, p + 8, c8, dst, pixel);
      }
      return;
    }
  }
#endif
  copy_scalar(plane, C, S, 0, S, 0, dst, pixel);
}

}  // namespace

template <typename T>
void to_grouped_nhwc(const T* src, int64_t tasks, int64_t N, int64_t C, int64_t S, T* dst) {
  const int64_t planes = N * tasks, pixel = tasks * C;
  // One (image, task) plane per iteration: its writes (pixel rows of C channels) belong to it alone.
#pragma omp parallel for schedule(static) if (planes * C * S > kParallelGrain && planes > 1)
  for (int64_t i = 0; i < planes; ++i) {
    const int64_t n = i / tasks, t = i % tasks;
    plane_to_channels_last(src + (t * N + n) * C * S, C, S, dst + n * S * pixel + t * C, pixel);
  }
}

template void to_grouped_nhwc<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*);
template void to_grouped_nhwc<double>(const double*, int64_t, int64_t, int64_t, int64_t, double*);

}  // namespace neuronml_fast::cpu
