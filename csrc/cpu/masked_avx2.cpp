// The AVX2 epilogue and prologue of masked.h (float32, C % 8 == 0; channels first: 8 or more
// contiguous pixels); see kernels_avx2.h.
#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"
#include "cpu/transpose.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

namespace {

// float32, C % 8 == 0: 8 channels at a time. Per pixel the portable loops (masked.cpp) gather or
// scatter each kept channel on its own (at a 25 %-active Conv4 block, 1.5-2x the time its memory
// traffic needs). Here each block of 8 channels moves with one permute: the slots of a block's
// kept channels are consecutive (compacted) or the channels themselves (identity), so
//   expand:   block = permute(compact[base .. base+8), expand_index), pruned lanes zeroed
//   compress: compact[base .. base+8) = permute(block, compress_index), later blocks overwrite
//             the lanes past this block's kept count (the row is built in L1, then copied)

// Eight permute indices or mask lanes. Kept as plain integers: a std::vector of __m256i is
// allocated without the 32-byte alignment its aligned loads and stores assume.
using Lanes = std::array<int32_t, 8>;

__m256i load(const Lanes& lanes) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes.data())); }

// Per task: for every block b of 8 channels, the first slot its kept channels use (`base`), the
// permutes and the keep mask (all-ones lanes for kept channels).
struct SlotBlocks {
  std::vector<int64_t> base;
  std::vector<Lanes> expand, compress, keep;
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
      Lanes e{}, k{}, cmp;
      cmp.fill(pruned_lane);
      for (int lane = 0; lane < 8; ++lane) {
        const int64_t j = slot[8 * b + lane];
        if (j < 0) continue;
        e[lane] = static_cast<int32_t>(j - start);
        k[lane] = -1;
        cmp[j - start] = lane;
      }
      base.push_back(start);
      row = std::max(row, last + 1);
      expand.push_back(e);
      compress.push_back(cmp);
      keep.push_back(k);
    }
  }
};

std::vector<SlotBlocks> plan_blocks(const MaskedLayout& L, const int64_t* slot) {
  std::vector<SlotBlocks> tasks;
  tasks.reserve(L.T);
  for (int64_t t = 0; t < L.T; ++t) tasks.emplace_back(slot + t * L.C, L.C);
  return tasks;
}

// One pixel of task `ts`: the compact row `staged` (with room for an 8-lane load past its last
// slot) expanded into C contiguous channels: p = (y + b) on kept channels, o = m * p, zeros for
// pruned ones.
void expand_pixel(const SlotBlocks& ts, int64_t blocks, const float* staged, const float* m, const float* b,
                  float* o, float* p) {
  for (int64_t k = 0; k < blocks; ++k) {
    const __m256 keep = _mm256_castsi256_ps(load(ts.keep[k]));
    const __m256 values = _mm256_permutevar8x32_ps(_mm256_loadu_ps(staged + ts.base[k]), load(ts.expand[k]));
    const __m256 v = _mm256_and_ps(_mm256_add_ps(values, _mm256_loadu_ps(b + 8 * k)), keep);
    _mm256_storeu_ps(p + 8 * k, v);
    _mm256_storeu_ps(o + 8 * k, _mm256_and_ps(_mm256_mul_ps(v, _mm256_loadu_ps(m + 8 * k)), keep));
  }
}

// One pixel of task `ts` (C contiguous channels of go, gp and pre; gp, pre nullable): the compact
// row of gy = go * m + gp built in `row` (C + 8 floats), sg += gy and sm += go * pre per channel.
void compress_pixel(const SlotBlocks& ts, int64_t blocks, const float* go, const float* gp, const float* pre,
                    const float* m, float* sg, float* sm, float* row) {
  for (int64_t k = 0; k < blocks; ++k) {
    const __m256 g = _mm256_loadu_ps(go + 8 * k);
    __m256 v = _mm256_mul_ps(g, _mm256_loadu_ps(m + 8 * k));
    if (gp) v = _mm256_add_ps(v, _mm256_loadu_ps(gp + 8 * k));
    _mm256_storeu_ps(sg + 8 * k, _mm256_add_ps(_mm256_loadu_ps(sg + 8 * k), v));
    if (pre)
      _mm256_storeu_ps(sm + 8 * k, _mm256_fmadd_ps(g, _mm256_loadu_ps(pre + 8 * k), _mm256_loadu_ps(sm + 8 * k)));
    v = _mm256_and_ps(v, _mm256_castsi256_ps(load(ts.keep[k])));
    _mm256_storeu_ps(row + ts.base[k], _mm256_permutevar8x32_ps(v, load(ts.compress[k])));
  }
}

// Channels-first planes go by bands of pixels, and within a band by blocks of 8 channels, each
// block sweeping the band in tiles of 8 pixels (one 8 x 8 register transpose). Why this order: a
// tile of all C channels at once writes (or reads) 2C channel rows of the plane at a time, more
// streams than the hardware prefetcher follows; block by block, 16 rows advance sequentially
// (the Conv4 block's epilogue: about 1.4x faster than by whole tiles). The compact rows of a band
// are staged (padded for 8-lane loads) in L1/L2.
struct Band {
  int64_t begin, end;  // pixels [begin, end), 8 or more

  int64_t tiles() const { return (end - begin + 7) / 8; }
  // Tile i covers pixels [first(i), first(i) + 8): a band whose length is not a multiple of 8 ends
  // with a tile overlapping the one before, whose first overlap(i) pixels that one covers.
  int64_t first(int64_t i) const { return std::min(begin + 8 * i, end - 8); }
  int64_t overlap(int64_t i) const { return begin + 8 * i - first(i); }
};

// Bands of kBandPixels to 2 * kBandPixels - 1 pixels (a plane of fewer: one band).
constexpr int64_t kBandPixels = 128;
constexpr int64_t kMaxBandPixels = 2 * kBandPixels - 1;

int64_t bands_of(int64_t S) { return std::max<int64_t>(1, S / kBandPixels); }
Band band(int64_t S, int64_t j) { return {S * j / bands_of(S), S * (j + 1) / bands_of(S)}; }

// Per-thread sums of the prologue per (task, channel), pruned channels included (discarded at the
// end: their gradients are exactly 0 whatever grad_out holds), merged in thread order.
struct PrologueSums {
  int64_t TC;
  std::vector<std::vector<float>> gy, mask;

  explicit PrologueSums(int64_t tc) : TC(tc), gy(max_threads()), mask(max_threads()) {}

  // The calling thread's (gy, mask) sums, zeroed.
  std::pair<float*, float*> mine() {
    std::vector<float>& g = gy[thread_id()];
    std::vector<float>& m = mask[thread_id()];
    g.assign(TC, 0.f);
    m.assign(TC, 0.f);
    return {g.data(), m.data()};
  }

  void finish(const int64_t* slot, bool has_pre, float* grad_bias, float* grad_mask) const {
    std::vector<float> total_gy(TC, 0.f), total_mask(TC, 0.f);
    for (size_t id = 0; id < gy.size(); ++id) {
      for (int64_t i = 0; i < TC && !gy[id].empty(); ++i) {
        total_gy[i] += gy[id][i];
        total_mask[i] += mask[id][i];
      }
    }
    for (int64_t i = 0; i < TC; ++i) {
      const bool kept = slot[i] >= 0;
      grad_bias[i] = kept ? total_gy[i] : 0.f;
      grad_mask[i] = kept && has_pre ? total_mask[i] : 0.f;
    }
  }
};

bool parallel(const MaskedLayout& L) { return L.N * L.S * L.T * L.C > kParallelGrain; }

void epilogue_channels_last(const MaskedLayout& L, const float* y, const int64_t* slot, const float* mask,
                            const float* bias, float* out, float* pre) {
  const int64_t C = L.C, blocks = C / 8;
  const std::vector<SlotBlocks> tasks = plan_blocks(L, slot);
  const std::vector<float> zeros(C, 0.f);
#pragma omp parallel if (parallel(L))
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
          const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
          expand_pixel(ts, blocks, staged.data(), mask + t * C, bias ? bias + t * C : zeros.data(), out + full,
                       pre + full);
        }
      }
    }
  }
}

void epilogue_channels_first(const MaskedLayout& L, const float* y, const int64_t* slot, const float* mask,
                             const float* bias, float* out, float* pre) {
  const int64_t C = L.C, blocks = C / 8, bands = bands_of(L.S), row_stride = C + 8;
  const std::vector<SlotBlocks> tasks = plan_blocks(L, slot);
  const std::vector<float> zeros(C, 0.f);
#pragma omp parallel if (parallel(L))
  {
    std::vector<float> staged(kMaxBandPixels * row_stride, 0.f);
#pragma omp for collapse(3) schedule(static)
    for (int64_t t = 0; t < L.T; ++t) {
      for (int64_t n = 0; n < L.N; ++n) {
        for (int64_t j = 0; j < bands; ++j) {
          const SlotBlocks& ts = tasks[t];
          const Band pixels = band(L.S, j);
          for (int64_t p = pixels.begin; p < pixels.end; ++p) {
            const float* src = y + t * L.stride_t + n * L.stride_n + p * L.stride_s;
            std::copy(src, src + ts.row, staged.data() + (p - pixels.begin) * row_stride);
          }
          const float* m = mask + t * C;
          const float* b = bias ? bias + t * C : zeros.data();
          for (int64_t k = 0; k < blocks; ++k) {
            const __m256 keep = _mm256_castsi256_ps(load(ts.keep[k])), b_k = _mm256_loadu_ps(b + 8 * k);
            const __m256i expand = load(ts.expand[k]);
            float* pre_k = pre + t * L.full_t + n * L.full_n + 8 * k * L.full_c;
            float* out_k = out + t * L.full_t + n * L.full_n + 8 * k * L.full_c;
            for (int64_t i = 0; i < pixels.tiles(); ++i) {
              const int64_t p0 = pixels.first(i);
              const float* rows = staged.data() + (p0 - pixels.begin) * row_stride + ts.base[k];
              __m256 r[8];  // pixel q's 8 channels, then (transposed) channel c's 8 pixels
              for (int q = 0; q < 8; ++q) {
                const __m256 values = _mm256_permutevar8x32_ps(_mm256_loadu_ps(rows + q * row_stride), expand);
                r[q] = _mm256_and_ps(_mm256_add_ps(values, b_k), keep);
              }
              transpose8x8(r);
              for (int c = 0; c < 8; ++c) {
                _mm256_storeu_ps(pre_k + c * L.full_c + p0, r[c]);
                // A pruned channel's pre is 0 and its mask is 0: the product is the masked 0.
                _mm256_storeu_ps(out_k + c * L.full_c + p0, _mm256_mul_ps(r[c], _mm256_set1_ps(m[8 * k + c])));
              }
            }
          }
        }
      }
    }
  }
}

void prologue_channels_last(const MaskedLayout& L, const float* grad_out, const float* grad_pre, const float* pre,
                            const int64_t* slot, const float* mask, float* gy, float* grad_bias, float* grad_mask) {
  const int64_t C = L.C, blocks = C / 8;
  const std::vector<SlotBlocks> tasks = plan_blocks(L, slot);
  PrologueSums sums(L.T * C);
#pragma omp parallel if (parallel(L))
  {
    const auto [sum_gy, sum_mask] = sums.mine();
    std::vector<float> row(C + 8, 0.f);  // the compact row, built in L1
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t s = 0; s < L.S; ++s) {
        for (int64_t t = 0; t < L.T; ++t) {
          const SlotBlocks& ts = tasks[t];
          const int64_t full = t * L.full_t + n * L.full_n + s * L.full_s;
          compress_pixel(ts, blocks, grad_out + full, grad_pre ? grad_pre + full : nullptr,
                         pre ? pre + full : nullptr, mask + t * C, sum_gy + t * C, sum_mask + t * C, row.data());
          std::copy(row.data(), row.data() + ts.row, gy + t * L.stride_t + n * L.stride_n + s * L.stride_s);
        }
      }
    }
  }
  sums.finish(slot, pre != nullptr, grad_bias, grad_mask);
}

// t[q] = the 8 channels of pixel q: rows c of `plane` (stride `channel`) at pixels [0, 8).
void load_transposed(const float* plane, int64_t channel, __m256 t[8]) {
  for (int c = 0; c < 8; ++c) t[c] = _mm256_loadu_ps(plane + c * channel);
  transpose8x8(t);
}

void prologue_channels_first(const MaskedLayout& L, const float* grad_out, const float* grad_pre, const float* pre,
                             const int64_t* slot, const float* mask, float* gy, float* grad_bias, float* grad_mask) {
  const int64_t C = L.C, blocks = C / 8, bands = bands_of(L.S), row_stride = C + 8;
  const std::vector<SlotBlocks> tasks = plan_blocks(L, slot);
  PrologueSums sums(L.T * C);
#pragma omp parallel if (parallel(L))
  {
    const auto [sum_gy, sum_mask] = sums.mine();
    std::vector<float> rows(kMaxBandPixels * row_stride, 0.f);  // the band's compact rows, built in L1/L2
#pragma omp for collapse(3) schedule(static)
    for (int64_t t = 0; t < L.T; ++t) {
      for (int64_t n = 0; n < L.N; ++n) {
        for (int64_t j = 0; j < bands; ++j) {
          const SlotBlocks& ts = tasks[t];
          const Band pixels = band(L.S, j);
          const int64_t plane = t * L.full_t + n * L.full_n;
          for (int64_t k = 0; k < blocks; ++k) {
            const __m256 m_k = _mm256_loadu_ps(mask + t * C + 8 * k), keep = _mm256_castsi256_ps(load(ts.keep[k]));
            const __m256i compress = load(ts.compress[k]);
            const int64_t block = plane + 8 * k * L.full_c;
            __m256 sg = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
            for (int64_t i = 0; i < pixels.tiles(); ++i) {
              const int64_t p0 = pixels.first(i);
              __m256 g[8], extra[8];
              load_transposed(grad_out + block + p0, L.full_c, g);
              __m256 v[8];
              for (int q = 0; q < 8; ++q) v[q] = _mm256_mul_ps(g[q], m_k);
              if (grad_pre) {
                load_transposed(grad_pre + block + p0, L.full_c, extra);
                for (int q = 0; q < 8; ++q) v[q] = _mm256_add_ps(v[q], extra[q]);
              }
              if (pre) load_transposed(pre + block + p0, L.full_c, extra);
              for (int64_t q = pixels.overlap(i); q < 8; ++q) {  // each pixel summed once
                sg = _mm256_add_ps(sg, v[q]);
                if (pre) sm = _mm256_fmadd_ps(g[q], extra[q], sm);
              }
              float* row = rows.data() + (p0 - pixels.begin) * row_stride + ts.base[k];
              for (int q = 0; q < 8; ++q)
                _mm256_storeu_ps(row + q * row_stride, _mm256_permutevar8x32_ps(_mm256_and_ps(v[q], keep), compress));
            }
            float* sg_k = sum_gy + t * C + 8 * k;
            float* sm_k = sum_mask + t * C + 8 * k;
            _mm256_storeu_ps(sg_k, _mm256_add_ps(_mm256_loadu_ps(sg_k), sg));
            _mm256_storeu_ps(sm_k, _mm256_add_ps(_mm256_loadu_ps(sm_k), sm));
          }
          for (int64_t p = pixels.begin; p < pixels.end; ++p) {
            const float* row = rows.data() + (p - pixels.begin) * row_stride;
            std::copy(row, row + ts.row, gy + t * L.stride_t + n * L.stride_n + p * L.stride_s);
          }
        }
      }
    }
  }
  sums.finish(slot, pre != nullptr, grad_bias, grad_mask);
}

}  // namespace

void masked_forward_epilogue(const MaskedLayout& L, const float* y, const int64_t* slot, const float* mask,
                             const float* bias, float* out, float* pre) {
  if (L.channels_first()) return epilogue_channels_first(L, y, slot, mask, bias, out, pre);
  epilogue_channels_last(L, y, slot, mask, bias, out, pre);
}

void masked_backward_prologue(const MaskedLayout& L, const float* grad_out, const float* grad_pre, const float* pre,
                              const int64_t* slot, const float* mask, float* gy, float* grad_bias, float* grad_mask) {
  if (L.channels_first())
    return prologue_channels_first(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
  prologue_channels_last(L, grad_out, grad_pre, pre, slot, mask, gy, grad_bias, grad_mask);
}

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
