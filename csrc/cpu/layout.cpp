#include "cpu/layout.h"

#include <type_traits>

#include "cpu/isa.h"
#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace {

// One (task, image) plane [C, S] into dst[p * pixel + c].
template <typename T>
void plane_to_channels_last(const T* plane, int64_t C, int64_t S, T* dst, int64_t pixel) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if constexpr (std::is_same_v<T, float>) {
    if (S >= 8 && use_avx2()) return avx2::plane_to_channels_last(plane, C, S, dst, pixel);
  }
#endif
  for (int64_t p = 0; p < S; ++p)
    for (int64_t c = 0; c < C; ++c) dst[p * pixel + c] = plane[c * S + p];
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
