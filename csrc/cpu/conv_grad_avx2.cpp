// The AVX2/FMA register-tile kernels of conv_grad.h; see kernels_avx2.h.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/kernels_avx2.h"
#include "cpu/parallel.h"
#include "cpu/transpose.h"

#if NEURONML_FAST_HAS_AVX2_TARGET
NEURONML_FAST_AVX2_BEGIN
namespace neuronml_fast::cpu::avx2 {

namespace {

constexpr int kRows = 6;   // register-tile rows: output channels (weight grad), positions (input grad)
constexpr int kCols = 16;  // input channels per register tile: two 8-float registers

// R rows of 16 floats held in 2R registers across a whole reduction (full unrolling keeps the
// arrays in registers).
template <int R>
struct Accumulators {
  __m256 lo[R], hi[R];

  void load(const float* p, int64_t step) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm256_loadu_ps(p + r * step);
      hi[r] = _mm256_loadu_ps(p + r * step + 8);
    }
  }
  void store(float* p, int64_t step) const {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(p + r * step, lo[r]);
      _mm256_storeu_ps(p + r * step + 8, hi[r]);
    }
  }
  // row r += b[r * b_step] * v for every r: R broadcasts, 2R FMAs.
  void fma(const float* b, int64_t b_step, __m256 v_lo, __m256 v_hi) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 br = _mm256_broadcast_ss(b + r * b_step);
      lo[r] = _mm256_fmadd_ps(br, v_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(br, v_hi, hi[r]);
    }
  }
};

// acc[r * acc_stride + 0..15] += sum over a rows x cols block of positions of
// gy[pos * gs + r] * x[pos * xs + 0..15], for r < R; rows advance gy by g_row and x by x_row.
template <int R>
void tile(const float* gy, int64_t gs, int64_t g_row, const float* x, int64_t xs, int64_t x_row, int64_t rows,
          int64_t cols, float* acc, int64_t acc_stride) {
  Accumulators<R> sum;
  sum.load(acc, acc_stride);
  for (int64_t i = 0; i < rows; ++i) {
    const float* gi = gy + i * g_row;
    const float* xi = x + i * x_row;
    for (int64_t p = 0; p < cols; ++p)
      sum.fma(gi + p * gs, 1, _mm256_loadu_ps(xi + p * xs), _mm256_loadu_ps(xi + p * xs + 8));
  }
  sum.store(acc, acc_stride);
}

// Calls f(std::integral_constant<int, R>{}) with R = rows (1..kRows): the register tiles are
// templates on their row count, so the accumulators are named registers.
template <typename F>
void with_rows(int rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, kRows>{});
  }
}

// Output positions [lo, hi) along one axis whose input position out * stride + offset lies in [0, size).
void valid_range(int64_t size, int64_t out_size, int64_t stride, int64_t offset, int64_t* lo, int64_t* hi) {
  *lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t last_in = size - 1 - offset;
  *hi = last_in < 0 ? 0 : std::min(out_size, last_in / stride + 1);
}

void accumulate(const ConvGradShape& s, const float* gy, const float* x, int64_t n0, int64_t n1, float* acc);

// Task-batched storage puts the tasks of a pixel side by side, so one task's consecutive pixels
// lie T*C floats apart: every position of a tile's sweep is another page, and a sweep over them
// runs at about 60 % of its rate over one task's contiguous images.
// Each image of the task is copied into contiguous L2-sized scratch first (2 x 50 KiB there,
// against 14.5 MFLOP of sweeps that reuse it).
void accumulate_staged(const ConvGradShape& s, const float* gy, const float* x, int64_t n0, int64_t n1, float* acc) {
  ConvGradShape image = s;
  image.N = 1;
  image.x_pixel = s.C;
  image.gy_pixel = s.A;
  std::vector<float> x_image(s.H * s.W * s.C), gy_image(s.H_out * s.W_out * s.A);
  for (int64_t n = n0; n < n1; ++n) {
    const float* x_n = x + n * s.H * s.W * s.x_pixel;
    for (int64_t p = 0; p < s.H * s.W; ++p)
      std::copy(x_n + p * s.x_pixel, x_n + p * s.x_pixel + s.C, x_image.data() + p * s.C);
    const float* gy_n = gy + n * s.H_out * s.W_out * s.gy_pixel;
    for (int64_t p = 0; p < s.H_out * s.W_out; ++p)
      std::copy(gy_n + p * s.gy_pixel, gy_n + p * s.gy_pixel + s.A, gy_image.data() + p * s.A);
    accumulate(image, gy_image.data(), x_image.data(), 0, 1, acc);
  }
}

// Images [n0, n1) of one task, summed into acc [A, KH, KW, C]. Per image and tap the valid output
// positions form a rectangle; every (16 input channels, 5-6 output channels) tile sweeps it with
// its accumulators in registers, the image's data staying in L1/L2 across the tiles.
void accumulate(const ConvGradShape& s, const float* gy, const float* x, int64_t n0, int64_t n1, float* acc) {
  if (s.x_pixel != s.C || s.gy_pixel != s.A) return accumulate_staged(s, gy, x, n0, n1, acc);
  const int64_t per_channel = s.KH * s.KW * s.C;  // acc stride between output channels
  const int64_t tiles = (s.A + kRows - 1) / kRows;   // register tiles over the output channels
  const int64_t xs = s.stride_w * s.x_pixel, x_row = s.stride_h * s.W * s.x_pixel, g_row = s.W_out * s.gy_pixel;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      int64_t oh_lo, oh_hi;
      valid_range(s.H, s.H_out, s.stride_h, kh * s.dil_h - s.pad_h, &oh_lo, &oh_hi);
      if (oh_hi <= oh_lo) continue;
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        int64_t ow_lo, ow_hi;
        valid_range(s.W, s.W_out, s.stride_w, kw * s.dil_w - s.pad_w, &ow_lo, &ow_hi);
        if (ow_hi <= ow_lo) continue;
        const int64_t ih = oh_lo * s.stride_h + kh * s.dil_h - s.pad_h;
        const int64_t iw = ow_lo * s.stride_w + kw * s.dil_w - s.pad_w;
        const float* x0 = x + ((n * s.H + ih) * s.W + iw) * s.x_pixel;
        const float* g0 = gy + ((n * s.H_out + oh_lo) * s.W_out + ow_lo) * s.gy_pixel;
        float* tap = acc + (kh * s.KW + kw) * s.C;
        for (int64_t c0 = 0; c0 < s.C; c0 += kCols) {
          // Near-equal tiles (16 = 5 + 5 + 6, not 6 + 6 + 4): a tile needs 10 accumulators to hide
          // the FMA latency.
          for (int64_t i = 0, a0 = 0; a0 < s.A; ++i) {
            const int64_t r = s.A * (i + 1) / tiles - a0;
            with_rows(static_cast<int>(r), [&](auto rows) {
              tile<decltype(rows)::value>(g0 + a0, s.gy_pixel, g_row, x0 + c0, xs, x_row, oh_hi - oh_lo,
                                          ow_hi - ow_lo, tap + a0 * per_channel + c0, per_channel);
            });
            a0 += r;
          }
        }
      }
    }
  }
}

// ---- input gradient ----

// acc[j * acc_step + 0..15] += sum over a < A of gy[j * gs + a] * w[a * ws + 0..15], for positions
// j < R: the 2R accumulators stay in registers over the A active channels.
template <int R>
void input_tile(const float* gy, int64_t gs, const float* w, int64_t ws, int64_t A, float* acc, int64_t acc_step) {
  Accumulators<R> sum;
  sum.load(acc, acc_step);
  for (int64_t a = 0; a < A; ++a) sum.fma(gy + a, gs, _mm256_loadu_ps(w + a * ws), _mm256_loadu_ps(w + a * ws + 8));
  sum.store(acc, acc_step);
}

// Row ih of image n of one task: row[iw * pixel + 0..C) = sum over taps (kh, kw) whose output row
// oh = (ih + pad_h - kh*dil_h) / stride_h exists, and over the output columns ow whose input
// column iw = ow*stride_w + kw*dil_w - pad_w exists, of gy[n, oh, ow, :] . w[:, kh, kw, :].
void input_grad_row(const ConvGradShape& s, const float* gy, const float* w, int64_t n, int64_t ih, float* row,
                    int64_t pixel) {
  for (int64_t iw = 0; iw < s.W; ++iw) std::fill(row + iw * pixel, row + iw * pixel + s.C, 0.f);
  const int64_t w_channel = s.KH * s.KW * s.C;  // w stride between active channels
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    const int64_t oh_scaled = ih + s.pad_h - kh * s.dil_h;
    if (oh_scaled < 0 || oh_scaled % s.stride_h != 0 || oh_scaled / s.stride_h >= s.H_out) continue;
    const float* gy_row = gy + (n * s.H_out + oh_scaled / s.stride_h) * s.W_out * s.gy_pixel;
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      int64_t ow_lo, ow_hi;
      valid_range(s.W, s.W_out, s.stride_w, kw * s.dil_w - s.pad_w, &ow_lo, &ow_hi);
      const float* tap = w + (kh * s.KW + kw) * s.C;
      // Greedy tiles of 6 positions (14 = 6 + 6 + 2), not near-equal ones (5 + 5 + 4): a 6-position
      // tile amortizes its loads best.
      for (int64_t ow = ow_lo; ow < ow_hi; ow += kRows) {
        const int positions = static_cast<int>(std::min<int64_t>(kRows, ow_hi - ow));
        float* acc = row + (ow * s.stride_w + kw * s.dil_w - s.pad_w) * pixel;
        for (int64_t c0 = 0; c0 < s.C; c0 += kCols) {
          with_rows(positions, [&](auto rows) {
            input_tile<decltype(rows)::value>(gy_row + ow * s.gy_pixel, s.gy_pixel, tap + c0, w_channel, s.A,
                                              acc + c0, s.stride_w * pixel);
          });
        }
      }
    }
  }
}

// ---- input gradient, unit column stride ----
// With stride_w == 1, the output columns a tile of consecutive input columns reads are
// consecutive too, for every tap. So a tile of R columns x 8V channels sums every (kh, kw, active
// channel) in registers (a reduction of kH*kW*A instead of A) and stores its result once, where
// `input_grad_row` adds each tap into the row in memory. The gy rows a row reads are staged
// zero-padded in L1 first, so the edge columns need no special case.

// The gy rows that input row `ih` of image `n` reads, staged for `input_tile_all_taps`: for each
// kh whose output row exists, in order, a row of `padded` columns x A channels where column q holds
// gy column q - lead (zero outside [0, W_out)). Returns the number of rows; kh_of[i] is row i's kh.
int stage_gy_rows(const ConvGradShape& s, const float* gy, int64_t n, int64_t ih, int64_t lead, int64_t padded,
                  float* staged, int64_t* kh_of) {
  int count = 0;
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    const int64_t oh_scaled = ih + s.pad_h - kh * s.dil_h;
    if (oh_scaled < 0 || oh_scaled % s.stride_h != 0 || oh_scaled / s.stride_h >= s.H_out) continue;
    const float* src = gy + (n * s.H_out + oh_scaled / s.stride_h) * s.W_out * s.gy_pixel;
    float* dst = staged + count * padded * s.A;
    for (int64_t q = 0; q < padded; ++q) {
      const int64_t ow = q - lead;
      if (ow >= 0 && ow < s.W_out)
        std::copy(src + ow * s.gy_pixel, src + ow * s.gy_pixel + s.A, dst + q * s.A);
      else
        std::fill(dst + q * s.A, dst + (q + 1) * s.A, 0.f);
    }
    kh_of[count++] = kh;
  }
  return count;
}

// out[r * out_step + 0..8V) = sum over staged rows i, taps kw and active channels a of
// staged[i][(col0 + r + lead + pad_w - kw*dil_w) * A + a] * w[a, kh_of[i], kw, 0..8V), for r < R:
// V weight loads and R broadcasts per R*V FMAs, the R*V accumulators in registers.
// Not inlined: on its own it keeps its loop counters in registers (inlined into the row loop,
// GCC spilled them and the inner loop read and wrote the stack on every iteration).
template <int R, int V>
__attribute__((noinline)) void input_tile_all_taps(const ConvGradShape& s, const float* staged, int rows, const int64_t* kh_of,
                         int64_t padded, int64_t lead, int64_t col0, const float* w, float* out, int64_t out_step) {
  __m256 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  const int64_t A = s.A, w_channel = s.KH * s.KW * s.C;
  for (int i = 0; i < rows; ++i) {
    const float* g_row = staged + i * padded * A + (col0 + lead + s.pad_w) * A;
    const float* w_row = w + kh_of[i] * s.KW * s.C;
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      const float* g = g_row - kw * s.dil_w * A;
      const float* wk = w_row + kw * s.C;
      for (int64_t a = 0; a < A; ++a) {
        __m256 wv[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(wk + a * w_channel + 8 * v);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 b = _mm256_broadcast_ss(g + r * A + a);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(b, wv[v], acc[r][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + r * out_step + 8 * v, acc[r][v]);
}

// Input columns per register tile of the unit-stride input gradient: 10 accumulators (5 columns x
// 2 vectors); at the Conv4 block's 14 columns (tiles at 0, 5, 9) faster than 6-column tiles.
constexpr int kColumnTile = 5;

// Row ih of image n (stride_w == 1): row[iw * pixel + 0..C). Column tiles of kColumnTile; a row
// whose width is not a multiple of it ends with a tile overlapping the one before (its columns
// are stored twice with the same values), so every tile runs at full width.
void input_grad_row_unit_stride(const ConvGradShape& s, const float* gy, const float* w, int64_t n, int64_t ih,
                                float* staged, int64_t* kh_of, float* row, int64_t pixel) {
  const int64_t lead = (s.KW - 1) * s.dil_w, padded = s.W + s.pad_w + lead;
  const int rows = stage_gy_rows(s, gy, n, ih, lead, padded, staged, kh_of);
  if (rows == 0 || s.A == 0) {
    for (int64_t iw = 0; iw < s.W; ++iw) std::fill(row + iw * pixel, row + iw * pixel + s.C, 0.f);
    return;
  }
  const int width = static_cast<int>(std::min<int64_t>(kColumnTile, s.W));
  for (int64_t col = 0; col < s.W; col += width) {
    const int64_t col0 = std::min(col, s.W - width);
    for (int64_t c0 = 0; c0 < s.C; c0 += kCols) {
      with_rows(width, [&](auto tile) {
        input_tile_all_taps<decltype(tile)::value, kCols / 8>(s, staged, rows, kh_of, padded, lead, col0, w + c0,
                                                              row + col0 * pixel + c0, pixel);
      });
    }
  }
}

// dst[c * channel_stride + iw] = src[iw * C + c] for a row of W positions: blocks of 8 channels x
// 8 positions transposed in registers. A row whose width is not a multiple of 8 ends with a block
// overlapping the previous one (the overlap is written twice with the same values; Zen 2's masked
// stores are slow); rows narrower than 8 use masked stores, their src padded to 8 positions.
void store_channels_first(const float* src, int64_t C, int64_t W, float* dst, int64_t channel_stride) {
  const auto block = [&](int64_t w0) {
    for (int64_t c0 = 0; c0 < C; c0 += 8) transpose_block8(src + w0 * C + c0, C, dst + c0 * channel_stride + w0,
                                                           channel_stride);
  };
  if (W < 8) {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(W)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * C + c0);
      transpose8x8(r);
      for (int k = 0; k < 8; ++k) _mm256_maskstore_ps(dst + (c0 + k) * channel_stride, keep, r[k]);
    }
    return;
  }
  for (int64_t w0 = 0; w0 + 8 <= W; w0 += 8) block(w0);
  if (W % 8 != 0) block(W - 8);
}

}  // namespace

void conv2d_weight_grad_nhwc(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t x_task,
                             const float* gy, const float* x, float* gw) {
  const int64_t size = s.A * s.KH * s.KW * s.C;
  std::fill(gw, gw + tasks * size, 0.f);
  const int threads = max_threads();
  if (tasks >= threads) {
    // Every thread owns whole tasks: no partial sums.
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) accumulate(s, gy + t * gy_task, x + t * x_task, 0, s.N, gw + t * size);
    return;
  }
  // Few tasks: split each task's images across the threads; partial sums added in thread order.
  const int team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, s.N)));
  std::vector<float> partial(static_cast<size_t>(team - 1) * size);
  for (int64_t t = 0; t < tasks; ++t) {
    float* out = gw + t * size;
    std::fill(partial.begin(), partial.end(), 0.f);
#pragma omp parallel num_threads(team)
    {
      const int id = thread_id();
      const int64_t n0 = s.N * id / team, n1 = s.N * (id + 1) / team;
      accumulate(s, gy + t * gy_task, x + t * x_task, n0, n1, id == 0 ? out : partial.data() + (id - 1) * size);
    }
    for (int id = 1; id < team; ++id) {
      const float* part = partial.data() + static_cast<size_t>(id - 1) * size;
      for (int64_t i = 0; i < size; ++i) out[i] += part[i];
    }
  }
}

void conv2d_input_grad(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t w_task,
                       const InputGradLayout& gx_layout, const float* gy, const float* w, float* gx) {
  const int64_t rows = s.N * s.H;
  const int64_t work = rows * tasks * s.W * s.C * std::max<int64_t>(1, s.A * s.KH * s.KW);
  const bool channels_last = gx_layout.channel == 1;
  // Every (image, input row, task) row of gx is written by one thread: no partial sums.
  const bool unit_stride = s.stride_w == 1;
  const int64_t padded = s.W + s.pad_w + (s.KW - 1) * s.dil_w;
#pragma omp parallel if (work >= kParallelGrain)
  {
    // Channels-first gx: each row is summed channels-last in L1, then transposed into place.
    std::vector<float> scratch(channels_last ? 0 : (s.W + 7) / 8 * 8 * s.C, 0.f);
    std::vector<float> staged(unit_stride ? s.KH * padded * s.A : 0);
    std::vector<int64_t> kh_of(s.KH);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows * tasks; ++r) {
      // Task-major: a thread's rows share their task's weights (kept in L2; task-minor order
      // would reload each task's 147 KiB for every row).
      const int64_t t = r / rows, nh = r % rows, n = nh / s.H, ih = nh % s.H;
      float* row = gx + t * gx_layout.task + n * gx_layout.image + ih * gx_layout.row;
      float* sum = channels_last ? row : scratch.data();
      const int64_t pixel = channels_last ? gx_layout.pixel : s.C;
      if (unit_stride)
        input_grad_row_unit_stride(s, gy + t * gy_task, w + t * w_task, n, ih, staged.data(), kh_of.data(), sum,
                                   pixel);
      else
        input_grad_row(s, gy + t * gy_task, w + t * w_task, n, ih, sum, pixel);
      if (!channels_last) store_channels_first(scratch.data(), s.C, s.W, row, gx_layout.channel);
    }
  }
}

}  // namespace neuronml_fast::cpu::avx2
NEURONML_FAST_AVX2_END
#endif
