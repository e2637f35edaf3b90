#include "cpu/masked.h"

namespace neuronml_fast::cpu {

template <typename T>
void masked_forward_epilogue(const CompactLayout& L, const T* y, const int64_t* slot, const T* mask,
                             const T* bias, T* out, T* pre) {
  const int64_t S = L.S;
  // Every element of out and pre is written exactly once: active channels from y, pruned as 0.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < L.T; ++t) {
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t full = ((t * L.N + n) * L.C + c) * S;
        const int64_t j = slot[t * L.C + c];
        T* o = out + full;
        T* p = pre + full;
        if (j < 0) {
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) o[s] = p[s] = T(0);
          continue;
        }
        const T* src = y + t * L.stride_t + n * L.stride_n + j * L.stride_j;
        const T b = bias ? bias[t * L.C + c] : T(0);
        const T m = mask[t * L.C + c];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
          const T v = src[s] + b;
          p[s] = v;
          o[s] = m * v;
        }
      }
    }
  }
}

template <typename T>
void masked_backward_prologue(const CompactLayout& L, const T* grad_out, const T* grad_pre, const T* pre,
                              const int64_t* slot, const T* mask, T* gy, T* grad_bias, T* grad_mask) {
  const int64_t S = L.S;
  // One (task, channel) per iteration: its reductions over samples and space need no atomics.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < L.T; ++t) {
    for (int64_t c = 0; c < L.C; ++c) {
      const int64_t j = slot[t * L.C + c];
      if (j < 0) {
        grad_bias[t * L.C + c] = T(0);
        grad_mask[t * L.C + c] = T(0);
        continue;
      }
      const T m = mask[t * L.C + c];
      T sum_gy = T(0), sum_mask = T(0);
      for (int64_t n = 0; n < L.N; ++n) {
        const int64_t full = ((t * L.N + n) * L.C + c) * S;
        const T* go = grad_out + full;
        T* dst = gy + t * L.stride_t + n * L.stride_n + j * L.stride_j;
        if (grad_pre) {
          const T* gp = grad_pre + full;
#pragma omp simd reduction(+ : sum_gy)
          for (int64_t s = 0; s < S; ++s) {
            const T v = go[s] * m + gp[s];
            dst[s] = v;
            sum_gy += v;
          }
        } else {
#pragma omp simd reduction(+ : sum_gy)
          for (int64_t s = 0; s < S; ++s) {
            const T v = go[s] * m;
            dst[s] = v;
            sum_gy += v;
          }
        }
        if (pre) {
          const T* p = pre + full;
#pragma omp simd reduction(+ : sum_mask)
          for (int64_t s = 0; s < S; ++s) sum_mask += go[s] * p[s];
        }
      }
      grad_bias[t * L.C + c] = sum_gy;
      grad_mask[t * L.C + c] = sum_mask;
    }
  }
}

#define INSTANTIATE(T)                                                                                        \
  template void masked_forward_epilogue<T>(const CompactLayout&, const T*, const int64_t*, const T*, const T*, \
                                           T*, T*);                                                           \
  template void masked_backward_prologue<T>(const CompactLayout&, const T*, const T*, const T*, const int64_t*, \
                                            const T*, T*, T*, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace neuronml_fast::cpu
