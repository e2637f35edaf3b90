#include "cpu/masked.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

template <typename T>
void epilogue_cl_scalar(const ChannelsLastLayout& L, const T* y, const int64_t* slot, const T* mask, const T* bias,
                        T* out, T* pre) {
  const int64_t C = L.C;
  std::vector<TaskSlots> tasks;
  tasks.reserve(L.T);
  for (int64_t t = 0; t < L.T; ++t) tasks.emplace_back(slot + t * C, C);
  std::vector<T> zeros(C, T(0));
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
            p[c] = v;
            o[c] = m[c] * v;
          }
        } else {
          // Zeros over the whole pixel (vector stores), then the active channels scattered: the
          // work follows the active fraction instead of a gather and a select per channel.
          std::fill(o, o + C, T(0));
          std::fill(p, p + C, T(0));
          const int64_t* ch = ts.channel_of_slot.data();
          const int64_t* sk = ts.slot_of_kept.data();
          const int64_t active = static_cast<int64_t>(ts.channel_of_slot.size());
          for (int64_t k = 0; k < active; ++k) {
            const int64_t c = ch[k];
            const T v = src[sk[k]] + b[c];
            p[c] = v;
            o[c] = m[c] * v;
          }
        }
      }
    }
  }
}

template <typename T>
void prologue_cl_scalar(const ChannelsLastLayout& L, const T* grad_out, const T* grad_pre, const T* pre,
                        const int64_t* slot, const T* mask, T* gy, T* grad_bias, T* grad_mask) {
  const int64_t C = L.C;
  std::vector<TaskSlots> tasks;
  tasks.reserve(L.T);
  int64_t width = 0;
  for (int64_t t = 0; t < L.T; ++t) {
    tasks.emplace_back(slot + t * C, C);
    width = std::max<int64_t>(width, static_cast<int64_t>(tasks.back().channel_of_slot.size()));
  }
  // Sums per (task, slot); channels innermost, so each thread reduces its rows into private
  // sums, merged at the end.
  const int64_t TA = L.T * width;
  std::vector<T> total_gy(TA, T(0)), total_mask(TA, T(0)), masks_by_slot(TA, T(0));
  for (int64_t t = 0; t < L.T; ++t) {
    const std::vector<int64_t>& ch = tasks[t].channel_of_slot;
    for (size_t k = 0; k < ch.size(); ++k) masks_by_slot[t * width + k] = mask[t * C + ch[k]];
  }
#pragma omp parallel if (L.N * L.S * L.T * C > kParallelGrain)
  {
    std::vector<T> sum_gy(TA, T(0)), sum_mask(TA, T(0));
    // Storage order (images, pixels, tasks, channels), as in the forward epilogue.
#pragma omp for collapse(2) schedule(static) nowait
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t s = 0; s < L.S; ++s) {
        for (int64_t t = 0; t < L.T; ++t) {
          const TaskSlots& ts = tasks[t];
          const int64_t A = static_cast<int64_t>(ts.channel_of_slot.size());
          const int64_t* ch = ts.channel_of_slot.data();
          const int64_t* sk = ts.slot_of_kept.data();
          T* sg = sum_gy.data() + t * width;
          T* sm = sum_mask.data() + t * width;
          const T* m_slot = masks_by_slot.data() + t * width;
          const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
          const T* go = grad_out + full;
          const T* gp = grad_pre ? grad_pre + full : nullptr;
          const T* p = pre ? pre + full : nullptr;
          T* dst = gy + t * L.stride_t + n * L.stride_n + s * L.stride_s;
          if (gp) {
#pragma omp simd
            for (int64_t k = 0; k < A; ++k) {
              const T v = go[ch[k]] * m_slot[k] + gp[ch[k]];
              dst[sk[k]] = v;
              sg[k] += v;
            }
          } else {
#pragma omp simd
            for (int64_t k = 0; k < A; ++k) {
              const T v = go[ch[k]] * m_slot[k];
              dst[sk[k]] = v;
              sg[k] += v;
            }
          }
          if (p) {
#pragma omp simd
            for (int64_t k = 0; k < A; ++k) sm[k] += go[ch[k]] * p[ch[k]];
          }
        }
      }
    }
#pragma omp critical
    for (int64_t i = 0; i < TA; ++i) {
      total_gy[i] += sum_gy[i];
      total_mask[i] += sum_mask[i];
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

#if defined(__AVX2__)
// ---- float32, AVX2, C % 8 == 0: 8 channels at a time ----
// Per pixel the scalar loops above gather or scatter each kept channel on its own (16 of 64 at a
// 25 % active Conv4 block: 0.46 ms epilogue, 0.61 ms prologue, where the memory traffic needs
// ~0.3 ms each). Here each block of 8 channels moves with one permute: the slots of a block's
// kept channels are consecutive (compacted) or the channels themselves (identity), so
//   expand:   block = permute(compact[base .. base+8), expand_index), pruned lanes zeroed
//   compress: compact[base .. base+8) = permute(block, compress_index), later blocks overwrite
//             the lanes past this block's kept count (the row is built in L1, then copied)

// Per task: for every block b of 8 channels, the first slot its kept channels use (`base`), the
// permutes and the keep mask (all-ones lanes for kept channels).
struct SlotBlocks {
  std::vector<int64_t> base;
  std::vector<__m256i> expand, compress, keep;
  int64_t row = 0;  // compact slots this task writes per pixel: kept count, or C (identity slots)

  SlotBlocks(const int64_t* slot, int64_t C) {
    for (int64_t b = 0; b < C / 8; ++b) {
      // A compress lane with no kept channel reads a pruned lane (zero after the keep mask), so
      // identity slots of pruned channels get zeros; in a block with none pruned, such lanes lie
      // past the block's kept slots: later blocks overwrite them, or they are past the row.
      int32_t pruned_lane = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (slot[8 * b + lane] < 0) pruned_lane = lane;
      // Identity slots (slot == channel for every kept lane: uncompacted tasks, and blocks with
      // nothing kept) start at the block's first channel, so all 8 slots are written (zeros for
      // pruned lanes); compacted kept slots are consecutive from the block's first kept one.
      int64_t first = -1, last = -1;
      bool identity = true;
      for (int lane = 0; lane < 8; ++lane) {
        const int64_t j = slot[8 * b + lane];
        if (j < 0) continue;
        if (first < 0) first = j;
        last = j;
        identity = identity && j == 8 * b + lane;
      }
      const int64_t start = identity ? 8 * b : first;
      int32_t e[8] = {}, k[8] = {}, cmp[8];
      std::fill(cmp, cmp + 8, pruned_lane);
      for (int lane = 0; lane < 8; ++lane) {
        const int64_t j = slot[8 * b + lane];
        if (j < 0) continue;
        e[lane] = static_cast<int32_t>(j - start);
        k[lane] = -1;
        cmp[j - start] = lane;
      }
      base.push_back(start);
      row = std::max(row, last + 1);
      expand.push_back(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e)));
      compress.push_back(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cmp)));
      keep.push_back(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)));
    }
  }
};

std::vector<SlotBlocks> plan_blocks(const ChannelsLastLayout& L, const int64_t* slot) {
  std::vector<SlotBlocks> tasks;
  tasks.reserve(L.T);
  for (int64_t t = 0; t < L.T; ++t) tasks.emplace_back(slot + t * L.C, L.C);
  return tasks;
}

void epilogue_cl_avx2(const ChannelsLastLayout& L, const float* y, const int64_t* slot, const float* mask,
                      const float* bias, float* out, float* pre) {
  const int64_t C = L.C, blocks = C / 8;
  const std::vector<SlotBlocks> tasks = plan_blocks(L, slot);
  const std::vector<float> zeros(C, 0.f);
#pragma omp parallel if (L.N * L.S * L.T * C > kParallelGrain)
  {
    // The compact row staged in L1 with room for every block's 8-lane load (blocks start at
    // most at their first channel), which may run past the row's last slot.
    std::vector<float> staged(C + 8, 0.f);
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t s = 0; s < L.S; ++s) {
        for (int64_t t = 0; t < L.T; ++t) {
          const SlotBlocks& ts = tasks[t];
          const float* src = y + t * L.stride_t + n * L.stride_n + s * L.stride_s;
          std::copy(src, src + ts.row, staged.data());
          const float* m = mask + t * C;
          const float* b = bias ? bias + t * C : zeros.data();
          const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
          for (int64_t k = 0; k < blocks; ++k) {
            const __m256 keep = _mm256_castsi256_ps(ts.keep[k]);
            const __m256 values = _mm256_permutevar8x32_ps(_mm256_loadu_ps(staged.data() + ts.base[k]), ts.expand[k]);
            const __m256 v = _mm256_and_ps(_mm256_add_ps(values, _mm256_loadu_ps(b + 8 * k)), keep);
            _mm256_storeu_ps(pre + full + 8 * k, v);
            _mm256_storeu_ps(out + full + 8 * k, _mm256_and_ps(_mm256_mul_ps(v, _mm256_loadu_ps(m + 8 * k)), keep));
          }
        }
      }
    }
  }
}

void prologue_cl_avx2(const ChannelsLastLayout& L, const float* grad_out, const float* grad_pre, const float* pre,
                      const int64_t* slot, const float* mask, float* gy, float* grad_bias, float* grad_mask) {
  const int64_t C = L.C, blocks = C / 8, TC = L.T * C;
  const std::vector<SlotBlocks> tasks = plan_blocks(L, slot);
  // Sums per (task, channel), pruned channels included (discarded at the end: their gradients
  // are exactly 0 whatever grad_out holds); per thread, merged in thread order.
  std::vector<float> total_gy(TC, 0.f), total_mask(TC, 0.f);
  const int team = max_threads();
  std::vector<std::vector<float>> partial_gy(team), partial_mask(team);
#pragma omp parallel if (L.N * L.S * L.T * C > kParallelGrain)
  {
    std::vector<float>& sum_gy = partial_gy[thread_id()];
    std::vector<float>& sum_mask = partial_mask[thread_id()];
    sum_gy.assign(TC, 0.f);
    sum_mask.assign(TC, 0.f);
    std::vector<float> row(C + 8, 0.f);  // the compact row, built in L1
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t s = 0; s < L.S; ++s) {
        for (int64_t t = 0; t < L.T; ++t) {
          const SlotBlocks& ts = tasks[t];
          const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
          const float* go = grad_out + full;
          const float* m = mask + t * C;
          float* sg = sum_gy.data() + t * C;
          float* sm = sum_mask.data() + t * C;
          for (int64_t k = 0; k < blocks; ++k) {
            const __m256 g = _mm256_loadu_ps(go + 8 * k);
            __m256 v = _mm256_mul_ps(g, _mm256_loadu_ps(m + 8 * k));
            if (grad_pre) v = _mm256_add_ps(v, _mm256_loadu_ps(grad_pre + full + 8 * k));
            _mm256_storeu_ps(sg + 8 * k, _mm256_add_ps(_mm256_loadu_ps(sg + 8 * k), v));
            if (pre)
              _mm256_storeu_ps(sm + 8 * k, _mm256_fmadd_ps(g, _mm256_loadu_ps(pre + full + 8 * k),
                                                           _mm256_loadu_ps(sm + 8 * k)));
            v = _mm256_and_ps(v, _mm256_castsi256_ps(ts.keep[k]));
            _mm256_storeu_ps(row.data() + ts.base[k], _mm256_permutevar8x32_ps(v, ts.compress[k]));
          }
          std::copy(row.data(), row.data() + ts.row, gy + t * L.stride_t + n * L.stride_n + s * L.stride_s);
        }
      }
    }
  }
  for (int id = 0; id < team; ++id) {
    for (int64_t i = 0; i < TC && !partial_gy[id].empty(); ++i) {
      total_gy[i] += partial_gy[id][i];
      total_mask[i] += partial_mask[id][i];
    }
  }
  for (int64_t i = 0; i < TC; ++i) {
    const bool kept = slot[i] >= 0;
    grad_bias[i] = kept ? total_gy[i] : 0.f;
    grad_mask[i] = kept && pre ? total_mask[i] : 0.f;
  }
}
#endif

}  // namespace

template <typename T>
void masked_forward_epilogue_cl(const ChannelsLastLayout& L, const T* y, const int64_t* slot, const T* mask,
                                const T* bias, T* out, T* pre) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (L.C % 8 == 0) return epilogue_cl_avx2(L, y, slot, mask, bias, out, pre);
  }
#endif
  epilogue_cl_scalar(L, y, slot, mask, bias, out, pre);
}

template <typename T>
void masked_backward_prologue_cl(const ChannelsLastLayout& L, const T* grad_out, const T* grad_pre, const T* pre,
                                 const int64_t* slot, const T* mask, T* gy, T* grad_bias, T* grad_mask) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (L.C % 8 == 0) return prologue_cl_avx2(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
  }
#endif
  prologue_cl_scalar(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
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

#define INSTANTIATE(T)                                                                                        \
  template void masked_forward_epilogue_cl<T>(const ChannelsLastLayout&, const T*, const int64_t*, const T*,     \
                                              const T*, T*, T*);                                                 \
  template void masked_backward_prologue_cl<T>(const ChannelsLastLayout&, const T*, const T*, const T*,          \
                                               const int64_t*, const T*, T*, T*, T*);
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
