#include "cpu/masked.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace {

// Per task: the kept channels in order with their slots.
struct TaskSlots {
  std::vector<int64_t> channel_of_slot, slot_of_kept;
  bool identity = true;  // slot c holds channel c for every c: plain contiguous loops

  TaskSlots(const int64_t* slot, int64_t C) {
    for (int64_t c = 0; c < C; ++c) {
      if (slot[c] >= 0) {
        channel_of_slot.push_back(c);
        slot_of_kept.push_back(slot[c]);
      }
      identity = identity && slot[c] == c;
    }
  }
};

// kContiguousChannels: full_c == 1 known at compile time, so the channel loops vectorize.
template <typename T, bool kContiguousChannels>
void epilogue_scalar(const MaskedLayout& L, const T* y, const int64_t* slot, const T* mask, const T* bias, T* out,
                     T* pre) {
  const int64_t C = L.C;
  std::vector<TaskSlots> tasks;
  tasks.reserve(L.T);
  for (int64_t t = 0; t < L.T; ++t) tasks.emplace_back(slot + t * C, C);
  std::vector<T> zeros(C, T(0));
  const int64_t fc = kContiguousChannels ? 1 : L.full_c;
  // Loop in storage order (grouped NHWC: images, pixels, tasks, channels): task-outer loops
  // stride T*C elements per pixel and miss the TLB on every row.
#pragma omp parallel for collapse(2) schedule(static) if (L.N * L.S * L.T * C > kParallelGrain)
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t s = 0; s < L.S; ++s) {
      for (int64_t t = 0; t < L.T; ++t) {
        const TaskSlots& ts = tasks[t];
        const T* m = mask + t * C;
        const T* b = bias ? bias + t * C : zeros.data();
        const T* src = y + t * L.stride_t + n * L.stride_n + s * L.stride_s;
        const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
        T* o = out + full;
        T* p = pre + full;
        if (ts.identity) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T v = src[c] + b[c];
            p[c * fc] = v;
            o[c * fc] = m[c] * v;
          }
        } else {
          // Zeros over the whole pixel (vector stores for contiguous channels), then the active
          // channels scattered: the work follows the active fraction instead of a gather and a
          // select per channel.
          for (int64_t c = 0; c < C; ++c) o[c * fc] = p[c * fc] = T(0);
          const int64_t* ch = ts.channel_of_slot.data();
          const int64_t* sk = ts.slot_of_kept.data();
          const int64_t active = static_cast<int64_t>(ts.channel_of_slot.size());
          for (int64_t k = 0; k < active; ++k) {
            const int64_t c = ch[k];
            const T v = src[sk[k]] + b[c];
            p[c * fc] = v;
            o[c * fc] = m[c] * v;
          }
        }
      }
    }
  }
}

template <typename T, bool kContiguousChannels>
void prologue_scalar(const MaskedLayout& L, const T* grad_out, const T* grad_pre, const T* pre, const int64_t* slot,
                     const T* mask, T* gy, T* grad_bias, T* grad_mask) {
  const int64_t C = L.C;
  std::vector<TaskSlots> tasks;
  tasks.reserve(L.T);
  int64_t width = 0;
  for (int64_t t = 0; t < L.T; ++t) {
    tasks.emplace_back(slot + t * C, C);
    width = std::max<int64_t>(width, static_cast<int64_t>(tasks.back().channel_of_slot.size()));
  }
  // Sums per (task, slot); channels innermost, so each thread reduces its rows into private
  // sums, merged at the end in thread order: with the static schedule the result is the same on
  // every run (a merge in arrival order makes float64 gradients differ from run to run).
  const int64_t TA = L.T * width, fc = kContiguousChannels ? 1 : L.full_c;
  const bool parallel = L.N * L.S * L.T * C > kParallelGrain;
  const int threads = parallel ? max_threads() : 1;
  std::vector<T> partial_gy(static_cast<size_t>(threads) * TA, T(0)),
      partial_mask(static_cast<size_t>(threads) * TA, T(0)), masks_by_slot(TA, T(0));
  for (int64_t t = 0; t < L.T; ++t) {
    const std::vector<int64_t>& ch = tasks[t].channel_of_slot;
    for (size_t k = 0; k < ch.size(); ++k) masks_by_slot[t * width + k] = mask[t * C + ch[k]];
  }
#pragma omp parallel if (parallel) num_threads(threads)
  {
    T* sum_gy = partial_gy.data() + static_cast<size_t>(thread_id()) * TA;
    T* sum_mask = partial_mask.data() + static_cast<size_t>(thread_id()) * TA;
    // Storage order (images, pixels, tasks, channels), as in the forward epilogue.
#pragma omp for collapse(2) schedule(static) nowait
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t s = 0; s < L.S; ++s) {
        for (int64_t t = 0; t < L.T; ++t) {
          const TaskSlots& ts = tasks[t];
          const int64_t A = static_cast<int64_t>(ts.channel_of_slot.size());
          const int64_t* ch = ts.channel_of_slot.data();
          const int64_t* sk = ts.slot_of_kept.data();
          T* sg = sum_gy + t * width;
          T* sm = sum_mask + t * width;
          const T* m_slot = masks_by_slot.data() + t * width;
          const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
          const T* go = grad_out + full;
          const T* gp = grad_pre ? grad_pre + full : nullptr;
          const T* p = pre ? pre + full : nullptr;
          T* dst = gy + t * L.stride_t + n * L.stride_n + s * L.stride_s;
          if (gp) {
#pragma omp simd
            for (int64_t k = 0; k < A; ++k) {
              const T v = go[ch[k] * fc] * m_slot[k] + gp[ch[k] * fc];
              dst[sk[k]] = v;
              sg[k] += v;
            }
          } else {
#pragma omp simd
            for (int64_t k = 0; k < A; ++k) {
              const T v = go[ch[k] * fc] * m_slot[k];
              dst[sk[k]] = v;
              sg[k] += v;
            }
          }
          if (p) {
#pragma omp simd
            for (int64_t k = 0; k < A; ++k) sm[k] += go[ch[k] * fc] * p[ch[k] * fc];
          }
        }
      }
    }
  }
  std::vector<T> total_gy(TA, T(0)), total_mask(TA, T(0));
  for (int th = 0; th < threads; ++th) {
    for (int64_t i = 0; i < TA; ++i) {
      total_gy[i] += partial_gy[static_cast<size_t>(th) * TA + i];
      total_mask[i] += partial_mask[static_cast<size_t>(th) * TA + i];
    }
  }
  for (int64_t i = 0; i < L.T * C; ++i) grad_bias[i] = grad_mask[i] = T(0);
  for (int64_t t = 0; t < L.T; ++t) {
    const std::vector<int64_t>& ch = tasks[t].channel_of_slot;
    for (size_t k = 0; k < ch.size(); ++k) {
      grad_bias[t * C + ch[k]] = total_gy[t * width + k];
      grad_mask[t * C + ch[k]] = total_mask[t * width + k];
    }
  }
}

#if NEURONML_FAST_HAS_AVX2_TARGET
// Whether the float32 AVX2 kernels take this layout: whole blocks of 8 channels, and channels
// first only with contiguous pixels, 8 or more of them (the 8 x 8 transposes).
bool avx2_handles(const MaskedLayout& L) {
  return L.C % 8 == 0 && (!L.channels_first() || (L.full_s == 1 && L.S >= 8)) && use_avx2();
}
#endif

}  // namespace

template <typename T>
void masked_forward_epilogue(const MaskedLayout& L, const T* y, const int64_t* slot, const T* mask, const T* bias,
                             T* out, T* pre) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_handles(L)) return avx2::masked_forward_epilogue(L, y, slot, mask, bias, out, pre);
  }
#endif
  if (L.channels_first()) return epilogue_scalar<T, false>(L, y, slot, mask, bias, out, pre);
  epilogue_scalar<T, true>(L, y, slot, mask, bias, out, pre);
}

template <typename T>
void masked_backward_prologue(const MaskedLayout& L, const T* grad_out, const T* grad_pre, const T* pre,
                              const int64_t* slot, const T* mask, T* gy, T* grad_bias, T* grad_mask) {
#if NEURONML_FAST_HAS_AVX2_TARGET
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_handles(L))
      return avx2::masked_backward_prologue(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
  }
#endif
  if (L.channels_first())
    return prologue_scalar<T, false>(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
  prologue_scalar<T, true>(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
}

template <typename T>
CompactionPlan plan_compaction(const T* mask, int64_t tasks, int64_t C, bool skip_zero, bool allow, int64_t* slot) {
  int64_t widest = 0, narrowest = C;
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t kept = 0;
    for (int64_t c = 0; c < C; ++c) {
      const bool keep = !skip_zero || mask[t * C + c] != T(0);
      slot[t * C + c] = keep ? kept : -1;
      kept += keep;
    }
    widest = std::max(widest, kept);
    narrowest = std::min(narrowest, kept);
  }
  if (allow && tasks > 0 && C > 0 && narrowest < C)  // something is pruned: compact slots
    return {widest, true, narrowest == widest};
  for (int64_t i = 0; i < tasks * C; ++i) slot[i] = slot[i] >= 0 ? i % C : -1;
  return {C, false, tasks == 0 || narrowest == C};
}

template <typename T>
void gather_rows(const T* src, int64_t src_t, int64_t src_c, int64_t tasks, int64_t C, int64_t row,
                 const int64_t* slot, int64_t width, T* dst) {
  for (int64_t t = 0; t < tasks; ++t) {
    T* task = dst + t * width * row;
    int64_t filled = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j = slot[t * C + c];
      if (j < 0) continue;
      std::copy(src + t * src_t + c * src_c, src + t * src_t + c * src_c + row, task + j * row);
      ++filled;
    }
    std::fill(task + filled * row, task + width * row, T(0));  // slots past the task's kept count
  }
}

template <typename T>
void scatter_rows(const T* src, int64_t src_t, int64_t src_c, int64_t tasks, int64_t C, int64_t row,
                  const int64_t* slot, T* dst) {
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j = slot[t * C + c];
      T* out = dst + (t * C + c) * row;
      if (j < 0)
        std::fill(out, out + row, T(0));
      else
        std::copy(src + t * src_t + j * src_c, src + t * src_t + j * src_c + row, out);
    }
  }
}

#define INSTANTIATE(T)                                                                                                \
  template void masked_forward_epilogue<T>(const MaskedLayout&, const T*, const int64_t*, const T*, const T*, T*,     \
                                           T*);                                                                       \
  template void masked_backward_prologue<T>(const MaskedLayout&, const T*, const T*, const T*, const int64_t*,        \
                                            const T*, T*, T*, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

#define INSTANTIATE_ROWS(T)                                                                                  \
  template CompactionPlan plan_compaction<T>(const T*, int64_t, int64_t, bool, bool, int64_t*);            \
  template void gather_rows<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*, int64_t, \
                               T*);                                                                        \
  template void scatter_rows<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*, T*);
INSTANTIATE_ROWS(float)
INSTANTIATE_ROWS(double)
#undef INSTANTIATE_ROWS

}  // namespace neuronml_fast::cpu
