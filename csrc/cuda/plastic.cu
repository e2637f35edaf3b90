#include <cooperative_groups.h>

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/plastic.h"

namespace neuronml_fast::cuda {

namespace {

constexpr int kWarps = kPlasticThreads / 32;
// Blocks per multiprocessor the time-loop kernels are compiled for: one leaves ptxas every register
// it wants (at most 128 here, so two blocks still fit); with no minimum its own choice (48 to 80)
// spills.
constexpr int kMinBlocks = 1;
constexpr int kTile = kPlasticReduceTile;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Quotient and remainder of step and row indices, which fit in 32 bits (bindings.cpp checks T, OUT
// and IN): a 32-bit division is a few inline instructions, a 64-bit one a call of a subroutine,
// around which ptxas spills the registers live across it.
__device__ __forceinline__ int64_t div32(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
}
__device__ __forceinline__ int64_t mod32(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) % static_cast<uint32_t>(b));
}

template <typename T> __device__ __forceinline__ T activation(T z, bool tanh_act) { return tanh_act ? tanh(z) : z; }

template <typename T>
__device__ __forceinline__ T update(const PlasticShape& s, T h, T p, T y, T eta, T m, T clip, bool clamp) {
  T next = s.rule == PlasticRule::kHebb  ? (T(1) - eta) * h + eta * y * p
           : s.rule == PlasticRule::kOja ? h + eta * y * (p - y * h)
                                         : h + m * y * p;
  if (clamp) next = next < -clip ? -clip : (next > clip ? clip : next);
  return next;
}

// H_t from H_{t+1} = rule(H_t) (unclipped: clipped traces are recomputed, not reconstructed), with
// `inverse` = 1 / (the factor the rule multiplies H_t by), formed once per row (`unupdate_factor`):
// no division per element.
template <typename T>
__device__ __forceinline__ T unupdate(const PlasticShape& s, T h, T p, T y, T eta, T m, T inverse) {
  return s.rule == PlasticRule::kModulated ? h - m * y * p : (h - eta * y * p) * inverse;
}

// 1 / d for the rules' factors 1 - eta and 1 - eta y^2, which lie in (0, 1]. float: the hardware's
// approximation and one Newton step, within a unit in the last place, where `1.0f / d` compiles to
// a call of a slow path for the ranges it cannot take, and ptxas spills the registers live across
// that call.
template <typename T> __device__ __forceinline__ T reciprocal(T d) { return T(1) / d; }
template <> __device__ __forceinline__ float reciprocal<float>(float d) {
  const float r = __fdividef(1.0f, d);
  return fmaf(r, fmaf(-d, r, 1.0f), r);
}

template <typename T> __device__ __forceinline__ T unupdate_factor(const PlasticShape& s, T y, T eta) {
  return s.rule == PlasticRule::kHebb  ? reciprocal(T(1) - eta)
         : s.rule == PlasticRule::kOja ? reciprocal(T(1) - eta * y * y)
                                       : T(1);
}

// Every block of the sequence (every block of the grid, when a sequence is several blocks of a
// cooperative launch) past this point before any goes on.
__device__ __forceinline__ void sequence_sync() {
  if (gridDim.y > 1) {
    cooperative_groups::this_grid().sync();
  } else {
    __syncthreads();
  }
}

// The sum of v over the block, in every thread, added in one order (deterministic).
template <typename T> __device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_all_sum(v);
  __syncthreads();  // the scratch's previous use is over
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// The rows [first, last) of part `part` of `parts` of a sequence's n rows (or columns).
struct Span {
  int64_t first, last;
  __device__ Span(int64_t n, int64_t part, int64_t parts) {
    const int64_t size = div32(n + parts - 1, parts);
    first = min64(n, part * size);
    last = min64(n, first + size);
  }
};

// The column pass's threads: `width` consecutive columns (a power of two up to a warp, no wider
// than the block's columns need) by `groups` groups of rows; each column's sum over its groups'
// partial sums is added in group order (deterministic).
struct ColumnLayout {
  int width, groups, lane, group;
  __device__ explicit ColumnLayout(int64_t columns) {
    width = 1;
    while (width < columns && width < 32) width *= 2;
    groups = kPlasticThreads / width;
    lane = static_cast<int>(threadIdx.x) % width;
    group = static_cast<int>(threadIdx.x) / width;
  }
};

// Types: S is the caller's (inputs, parameters, outputs, the parameters' gradients), T the
// accumulation type (the trace, the checkpoints, y_t and dL/dz_t as the kernels read them back,
// the scratch buffers, every sum): float for float16, bfloat16 and float; double for double.
template <typename T, typename S> __device__ __forceinline__ T wide(const S* p, int64_t i) {
  return to_acc<T>(p[i]);
}

// Stores v in the caller's type where that is narrower than T (the accumulation buffer holds it already).
template <typename S, typename T> __device__ __forceinline__ void store_narrow(S* p, int64_t i, T v) {
  if constexpr (!std::is_same_v<S, T>) p[i] = from_acc<S>(v);
}

// pre_t of one sequence: x_t or y0 (the caller's type), y_{t-1} (the accumulation type), or zeros.
template <typename S, typename T> struct Pre {
  const S* given = nullptr;
  const T* state = nullptr;
  __device__ explicit operator bool() const { return given || state; }
  __device__ T operator[](int64_t i) const { return state ? state[i] : to_acc<T>(given[i]); }
};

template <typename S, typename T> struct Layer {
  PlasticShape s;
  const S *x, *y0;
  const T* out;  // y in the accumulation type
  const S *mod, *fanout;

  // pre_t of sequence b: x_t, or y_{t-1} (y0, or none for zeros, at t = 0).
  __device__ Pre<S, T> pre(int64_t t, int64_t b) const {
    Pre<S, T> p;
    if (!s.recurrent) {
      p.given = x + (t * s.B + b) * s.IN;
    } else if (t > 0) {
      p.state = out + ((t - 1) * s.B + b) * s.IN;
    } else if (y0) {
      p.given = y0 + b * s.IN;
    }
    return p;
  }
  // M_t[j] of sequence b: given, or the modulator's fanout[j] * activity (a null fanout is ones).
  __device__ T modulation(int64_t t, int64_t b, int64_t j, T activity) const {
    if (s.rule != PlasticRule::kModulated) return T(0);
    if (s.endogenous) return fanout ? wide<T>(fanout, j) * activity : activity;
    return s.per_neuron ? wide<T>(mod, (t * s.B + b) * s.OUT + j) : wide<T>(mod, t * s.B + b);
  }
};

template <typename S, typename T> struct Forward {
  Layer<S, T> l;
  bool resident;
  const S *weight, *alpha, *eta, *bias, *drive;
  const T* hebb;
  const S *mod_weight, *mod_bias;
  T *trace, *checkpoints, *activity, *output;  // output: y in the accumulation type
  S* narrow;  // y in the caller's type (S narrower than T)
};

// Pass t = 0..T over the block's rows, a warp per row: H_t (the initial trace at t = 0, else step
// t-1's update of H_{t-1}: the update waits for the next pass, where M_{t-1} is known even when
// the modulator computes it from every row's y_{t-1}), stored (and kept every `every` steps), and
// z_t from it; pass T only applies the last update.
template <typename S, typename T>
__global__ void __launch_bounds__(kPlasticThreads, kMinBlocks) forward_kernel(Forward<S, T> k) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ T scratch[kWarps];
  const PlasticShape& s = k.l.s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x, part = blockIdx.y, matrix = s.OUT * s.IN;
  const Span rows(s.OUT, part, gridDim.y);
  T* h = k.resident ? reinterpret_cast<T*>(smem_raw) : k.trace + b * matrix;
  const T* hebb = k.hebb ? k.hebb + b * matrix : nullptr;
  const T eta = wide<T>(k.eta, 0), clip = static_cast<T>(s.clip);
  T activity = T(0);  // the modulator's output of the previous step
  for (int64_t t = 0; t <= s.T; ++t) {
    const bool stepping = t < s.T, keep = stepping && mod32(t, s.every) == 0;
    const Pre<S, T> p = stepping ? k.l.pre(t, b) : Pre<S, T>{};
    const Pre<S, T> p_prev = t > 0 ? k.l.pre(t - 1, b) : Pre<S, T>{};
    T* checkpoint = k.checkpoints + (div32(t, s.every) * s.B + b) * matrix;
    for (int64_t j = rows.first + warp; j < rows.last; j += kWarps) {
      T* hr = h + j * s.IN;
      const T y_prev = t > 0 ? k.output[((t - 1) * s.B + b) * s.OUT + j] : T(0);
      const T m_prev = t > 0 ? k.l.modulation(t - 1, b, j, activity) : T(0);
      T z = T(0);
      for (int64_t i = lane; i < s.IN; i += 32) {
        T hv;
        if (t == 0) {
          hv = hebb ? hebb[j * s.IN + i] : T(0);
        } else {
          hv = update(s, hr[i], p_prev ? p_prev[i] : T(0), y_prev, eta, m_prev, clip, s.has_clip);
        }
        hr[i] = hv;
        if (keep) checkpoint[j * s.IN + i] = hv;
        if (p) {
          const T a = wide<T>(k.alpha, s.alpha_scalar ? 0 : j * s.IN + i);
          z += (wide<T>(k.weight, j * s.IN + i) + a * hv) * p[i];
        }
      }
      z = warp_all_sum(z);
      if (stepping && lane == 0) {
        const int64_t row = (t * s.B + b) * s.OUT + j;
        if (s.recurrent) {
          z += wide<T>(k.l.x, row);
        } else {
          if (k.bias) z += wide<T>(k.bias, j);
          if (k.drive) z += wide<T>(k.drive, row);
        }
        const T y = activation(z, s.tanh);
        k.output[row] = y;
        store_narrow(k.narrow, row, y);
      }
    }
    sequence_sync();  // y_t: the next pass's post and pre, and the modulator's input, in every block
    if (s.endogenous && stepping) {
      T partial = T(0);
      for (int64_t j = threadIdx.x; j < s.OUT; j += blockDim.x) {
        partial += wide<T>(k.mod_weight, j) * k.output[(t * s.B + b) * s.OUT + j];
      }
      const T input = block_sum(partial, scratch) + (k.mod_bias ? wide<T>(k.mod_bias, 0) : T(0));
      activity = s.mod_tanh ? tanh(input) : input;
      if (part == 0 && threadIdx.x == 0) k.activity[t * s.B + b] = activity;
    }
  }
  if (k.resident) {
    for (int64_t e = threadIdx.x; e < matrix; e += blockDim.x) k.trace[b * matrix + e] = h[e];
  }
}

template <typename S, typename T> struct Backward {
  Layer<S, T> l;
  const S *weight, *alpha, *eta, *grad_output;
  const T* activity;
  const S* mod_weight;
  const T *checkpoints, *hebb_final, *grad_hebb_in;
  T *trace, *segment, *grad_hebb, *grad_z, *grad_pre;
  S* grad_mod;
  T *mod_rows, *alpha_part, *eta_part, *mod_weight_part, *mod_bias_part, *mod_fanout_part;
  S *grad_z_out, *grad_pre_out;  // grad_z and grad_pre in the caller's type (S narrower than T)
};

// The segment of step t's checkpoint, recomputed forward up to H_t: segment slot u % every holds
// H_u. Each block recomputes its own rows (a row's update reads nothing of the others).
template <typename S, typename T>
__device__ void recompute_segment(const Backward<S, T>& k, int64_t t, int64_t b, const Span& rows, T eta, T clip) {
  const PlasticShape& s = k.l.s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t matrix = s.OUT * s.IN, segment = div32(t, s.every), start = segment * s.every;
  const T* checkpoint = k.checkpoints + (segment * s.B + b) * matrix;
  for (int64_t u = start; u <= t; ++u) {
    T* slot = k.segment + ((u - start) * s.B + b) * matrix;  // u % every
    const T* prev = u > start ? slot - s.B * matrix : slot;  // slot (u - 1) % every
    const Pre<S, T> p = u > start ? k.l.pre(u - 1, b) : Pre<S, T>{};
    const T activity = u > start && s.endogenous ? k.activity[(u - 1) * s.B + b] : T(0);
    for (int64_t j = rows.first + warp; j < rows.last; j += kWarps) {
      const T y = u > start ? k.l.out[((u - 1) * s.B + b) * s.OUT + j] : T(0);
      const T m = u > start ? k.l.modulation(u - 1, b, j, activity) : T(0);
      for (int64_t i = lane; i < s.IN; i += 32) {  // the same lane wrote prev's element: no barrier
        const int64_t e = j * s.IN + i;
        slot[e] = u == start ? checkpoint[e] : update(s, prev[e], p ? p[i] : T(0), y, eta, m, clip, s.has_clip);
      }
    }
  }
}

// dL/dH' with the entries the clip held at its bound zeroed.
template <typename T>
__device__ __forceinline__ T clip_mask(const PlasticShape& s, T g, T h, T p, T y, T eta, T m, T clip) {
  if (!s.has_clip) return g;
  const T next = update(s, h, p, y, eta, m, clip, false);
  return next < -clip || next > clip ? T(0) : g;
}

// Steps t = T-1..0 in reverse. Rows (a warp per row of the block's span): H_t, the clip mask on
// dL/dH_{t+1}, the rule's share of dL/dy_t and dL/dM_t, and dL/dz_t. Columns (the block's span of
// columns, each summed over every row: ColumnLayout): dL/dH_t, alpha, eta and dL/dpre_t.
template <typename S, typename T>
__global__ void __launch_bounds__(kPlasticThreads, kMinBlocks) backward_kernel(Backward<S, T> k) {
  __shared__ T scratch[kWarps];
  __shared__ T column_sums[kPlasticThreads];
  const PlasticShape& s = k.l.s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x, part = blockIdx.y, parts = gridDim.y, matrix = s.OUT * s.IN;
  const Span rows(s.OUT, part, parts), cols(s.IN, part, parts);
  const ColumnLayout layout(cols.last - cols.first);
  const T eta = wide<T>(k.eta, 0), clip = static_cast<T>(s.clip);
  const bool modulated = s.rule == PlasticRule::kModulated;
  T* trace = k.trace ? k.trace + b * matrix : nullptr;
  T* grad_hebb = k.grad_hebb + b * matrix;
  T eta_sum = T(0), alpha_sum = T(0), mod_bias_sum = T(0);
  for (int64_t t = s.T - 1; t >= 0; --t) {
    const bool last = t == s.T - 1;
    const bool restart = mod32(t + 1, s.every) == 0;  // H_{t+1} is a checkpoint
    if (s.recompute && (last || restart)) recompute_segment(k, t, b, rows, eta, clip);
    const T activity = s.endogenous ? k.activity[t * s.B + b] : T(0);
    const Pre<S, T> p = k.l.pre(t, b);
    // What this step reads as its trace: H_t (recomputed), or H_{t+1} to reconstruct H_t from.
    const T* source = s.recompute ? k.segment + (mod32(t, s.every) * s.B + b) * matrix
                      : last      ? k.hebb_final + b * matrix
                      : restart   ? k.checkpoints + (div32(t + 1, s.every) * s.B + b) * matrix
                                  : trace;
    const T* h_t = s.recompute ? source : trace;
    const T* g_next = last ? (k.grad_hebb_in ? k.grad_hebb_in + b * matrix : nullptr) : grad_hebb;  // dL/dH_{t+1}
    for (int64_t j = rows.first + warp; j < rows.last; j += kWarps) {
      const int64_t row = (t * s.B + b) * s.OUT + j;
      const T y = k.l.out[row], m = k.l.modulation(t, b, j, activity);
      const T inverse = s.recompute ? T(1) : unupdate_factor(s, y, eta);
      T dy = T(0), dm = T(0);
      for (int64_t i = lane; i < s.IN; i += 32) {
        const int64_t e = j * s.IN + i;
        const T pi = p ? p[i] : T(0);
        T hv = source[e];
        if (!s.recompute) {
          hv = unupdate(s, hv, pi, y, eta, m, inverse);
          trace[e] = hv;
        }
        const T g = clip_mask(s, g_next ? g_next[e] : T(0), hv, pi, y, eta, m, clip);
        if (s.rule == PlasticRule::kHebb) {
          dy += g * eta * pi;
        } else if (s.rule == PlasticRule::kOja) {
          dy += g * eta * (pi - T(2) * y * hv);
        } else {
          dy += g * m * pi;
          dm += g * y * pi;
        }
      }
      dy = warp_all_sum(dy);
      dm = warp_all_sum(dm);
      if (lane == 0) {
        T gy = dy + (k.grad_output ? wide<T>(k.grad_output, row) : T(0));
        if (s.recurrent && !last) gy += k.grad_pre[b * s.OUT + j];  // dL/dy_t through step t+1's pre
        if (s.endogenous) {  // completed below, once dL/ds_t is known
          k.grad_z[row] = gy;
        } else {
          const T gz = s.tanh ? gy * (T(1) - y * y) : gy;
          k.grad_z[row] = gz;
          store_narrow(k.grad_z_out, row, gz);
        }
        if (modulated && s.per_neuron && !s.endogenous) {
          k.grad_mod[row] = from_acc<S>(dm);
        } else if (modulated) {
          k.mod_rows[b * s.OUT + j] = dm;
        }
      }
    }
    sequence_sync();  // every row's dL/dz_t (and dL/dM_t) before the columns read them
    if (s.endogenous) {
      // M_t = fanout * act(s_t), s_t = mod_weight . y_t + mod_bias: dL/ds_t, then its share of dL/dy_t.
      T partial = T(0);
      for (int64_t j = threadIdx.x; j < s.OUT; j += blockDim.x) {
        partial += (k.l.fanout ? wide<T>(k.l.fanout, j) : T(1)) * k.mod_rows[b * s.OUT + j];
      }
      const T total = block_sum(partial, scratch);
      const T gs = s.mod_tanh ? total * (T(1) - activity * activity) : total;
      mod_bias_sum += gs;
      for (int64_t j = rows.first + threadIdx.x; j < rows.last; j += blockDim.x) {
        const int64_t row = (t * s.B + b) * s.OUT + j, slot = b * s.OUT + j;
        const T y = k.l.out[row], gy = k.grad_z[row] + gs * wide<T>(k.mod_weight, j);
        const T gz = s.tanh ? gy * (T(1) - y * y) : gy;
        k.grad_z[row] = gz;
        store_narrow(k.grad_z_out, row, gz);
        k.mod_weight_part[slot] = (last ? T(0) : k.mod_weight_part[slot]) + gs * y;
        if (k.mod_fanout_part) {
          k.mod_fanout_part[slot] = (last ? T(0) : k.mod_fanout_part[slot]) + k.mod_rows[slot] * activity;
        }
      }
      sequence_sync();
    } else if (modulated && !s.per_neuron && part == 0) {
      T partial = T(0);
      for (int64_t j = threadIdx.x; j < s.OUT; j += blockDim.x) partial += k.mod_rows[b * s.OUT + j];
      const T total = block_sum(partial, scratch);
      if (threadIdx.x == 0) k.grad_mod[t * s.B + b] = from_acc<S>(total);
    }
    const T* grad_z = k.grad_z + (t * s.B + b) * s.OUT;
    const T* y_t = k.l.out + (t * s.B + b) * s.OUT;
    for (int64_t c0 = cols.first; c0 < cols.last; c0 += layout.width) {
      const int64_t i = c0 + layout.lane;
      T gp = T(0);
      if (i < cols.last) {
        const T pi = p ? p[i] : T(0);
        for (int64_t j = layout.group; j < s.OUT; j += layout.groups) {
          const int64_t e = j * s.IN + i;
          const T y = y_t[j], gz = grad_z[j], m = k.l.modulation(t, b, j, activity);
          const T hv = h_t[e];
          const T g = clip_mask(s, g_next ? g_next[e] : T(0), hv, pi, y, eta, m, clip);
          const T a = wide<T>(k.alpha, s.alpha_scalar ? 0 : e);
          const T hz = gz * pi;
          if (s.alpha_scalar) {
            alpha_sum += hz * hv;
          } else {
            T* slot = k.alpha_part + b * matrix + e;
            *slot = (last ? T(0) : *slot) + hz * hv;
          }
          T d_h, d_p;
          if (s.rule == PlasticRule::kHebb) {
            d_h = T(1) - eta, d_p = eta * y;
            eta_sum += g * (y * pi - hv);
          } else if (s.rule == PlasticRule::kOja) {
            d_h = T(1) - eta * y * y, d_p = eta * y;
            eta_sum += g * y * (pi - y * hv);
          } else {
            d_h = T(1), d_p = m * y;
          }
          gp += (wide<T>(k.weight, e) + a * hv) * gz + g * d_p;
          grad_hebb[e] = g * d_h + a * hz;
        }
      }
      column_sums[threadIdx.x] = gp;
      __syncthreads();
      if (threadIdx.x < layout.width && c0 + threadIdx.x < cols.last) {
        T sum = T(0);
        for (int q = 0; q < layout.groups; ++q) sum += column_sums[q * layout.width + threadIdx.x];
        const int64_t slot = (s.recurrent ? b : t * s.B + b) * s.IN + c0 + threadIdx.x;
        k.grad_pre[slot] = sum;
        if (!s.recurrent || t == 0) store_narrow(k.grad_pre_out, slot, sum);  // the rnn's dL/dy0: at t = 0
      }
      __syncthreads();  // column_sums is reused
    }
    sequence_sync();  // dL/dH_t, H_t and dL/dy_{t-1}, read by the next step in every block
  }
  const T eta_total = block_sum(eta_sum, scratch), alpha_total = block_sum(alpha_sum, scratch);
  if (threadIdx.x == 0) {
    k.eta_part[b * parts + part] = eta_total;
    if (s.alpha_scalar) k.alpha_part[b * parts + part] = alpha_total;
    if (k.mod_bias_part && part == 0) k.mod_bias_part[b] = mod_bias_sum;
  }
}

template <typename S, typename T> struct Reduce {
  PlasticShape s;
  int64_t parts;
  const S *x, *y0;
  const T *output, *grad_z, *alpha_part, *eta_part, *mod_weight_part, *mod_bias_part, *mod_fanout_part;
  S *grad_weight, *grad_bias, *grad_alpha, *grad_eta, *grad_mod_weight, *grad_mod_bias, *grad_mod_fanout;
};

// Block (x, y) owns the [16, 16] tile (rows y, columns x) of the weight gradient, the sum over
// k = (t, b) of dL/dz_t[b] (x) pre_t[b] (a tiled matrix product through shared memory), and of
// alpha's, the sum of its partial sums over the sequences; column tile 0 the bias gradient
// (linear); block (0, 0) the scalars and the modulator's. Every sum in a fixed order.
template <typename S, typename T>
__global__ void __launch_bounds__(kTile * kTile) reduce_kernel(Reduce<S, T> k) {
  __shared__ T gz_tile[kTile][kTile + 1], pre_tile[kTile][kTile + 1];
  const PlasticShape& s = k.s;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTile + tx, j = static_cast<int64_t>(blockIdx.y) * kTile + ty;
  const int64_t steps = s.T * s.B;
  T weight_sum = T(0), bias_sum = T(0);
  for (int64_t k0 = 0; k0 < steps; k0 += kTile) {
    const int64_t kk = k0 + ty;  // this thread loads row kk of both tiles
    const int64_t gz_col = static_cast<int64_t>(blockIdx.y) * kTile + tx;
    gz_tile[ty][tx] = kk < steps && gz_col < s.OUT ? k.grad_z[kk * s.OUT + gz_col] : T(0);
    T pre = T(0);
    if (kk < steps && i < s.IN) {
      if (!s.recurrent) {
        pre = wide<T>(k.x, kk * s.IN + i);
      } else if (kk >= s.B) {
        pre = k.output[(kk - s.B) * s.IN + i];
      } else if (k.y0) {
        pre = wide<T>(k.y0, kk * s.IN + i);
      }
    }
    pre_tile[ty][tx] = pre;
    __syncthreads();
    for (int q = 0; q < kTile; ++q) {
      weight_sum += gz_tile[q][ty] * pre_tile[q][tx];
      bias_sum += gz_tile[q][ty];
    }
    __syncthreads();
  }
  if (j < s.OUT && i < s.IN) {
    const int64_t e = j * s.IN + i;
    k.grad_weight[e] = from_acc<S>(weight_sum);
    if (!s.alpha_scalar) {
      T sum = T(0);
      for (int64_t b = 0; b < s.B; ++b) sum += k.alpha_part[b * s.OUT * s.IN + e];
      k.grad_alpha[e] = from_acc<S>(sum);
    }
  }
  if (!s.recurrent && blockIdx.x == 0 && tx == 0 && j < s.OUT) k.grad_bias[j] = from_acc<S>(bias_sum);
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    const int flat = ty * kTile + tx;
    const int64_t parts = s.B * k.parts;
    if (flat == 0) {
      T eta = T(0), alpha = T(0), bias = T(0);
      for (int64_t q = 0; q < parts; ++q) eta += k.eta_part[q];
      *k.grad_eta = from_acc<S>(eta);
      if (s.alpha_scalar) {
        for (int64_t q = 0; q < parts; ++q) alpha += k.alpha_part[q];
        *k.grad_alpha = from_acc<S>(alpha);
      }
      if (k.grad_mod_bias) {
        for (int64_t b = 0; b < s.B; ++b) bias += k.mod_bias_part[b];
        *k.grad_mod_bias = from_acc<S>(bias);
      }
    }
    if (s.endogenous) {
      for (int64_t n = flat; n < s.OUT; n += kTile * kTile) {
        T weight = T(0), fanout = T(0);
        for (int64_t b = 0; b < s.B; ++b) {
          weight += k.mod_weight_part[b * s.OUT + n];
          if (k.grad_mod_fanout) fanout += k.mod_fanout_part[b * s.OUT + n];
        }
        k.grad_mod_weight[n] = from_acc<S>(weight);
        if (k.grad_mod_fanout) k.grad_mod_fanout[n] = from_acc<S>(fanout);
      }
    }
  }
}

template <typename T> const T* in(const void* p) { return static_cast<const T*>(p); }
template <typename T> T* out(void* p) { return static_cast<T*>(p); }

template <typename S, typename T>
Layer<S, T> layer(const PlasticShape& s, const void* x, const void* y0, const void* output, const void* mod,
                  const void* fanout) {
  return Layer<S, T>{s, in<S>(x), in<S>(y0), in<T>(output), in<S>(mod), in<S>(fanout)};
}

// Blocks of each kernel one multiprocessor holds at once, and the device's multiprocessors.
template <typename S, typename T>
cudaError_t capacity(int64_t* blocks, int* multiprocessors, int* cooperative, int* optin_shared) {
  int device = 0, forward = 0, backward = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(optin_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&forward, forward_kernel<S, T>, kPlasticThreads, 0);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&backward, backward_kernel<S, T>, kPlasticThreads, 0);
  }
  *blocks = static_cast<int64_t>(forward < backward ? forward : backward) * *multiprocessors;
  return err;
}

template <typename S, typename T>
cudaError_t plan(const PlasticShape& s, int64_t requested_parts, int requested_resident, PlasticPlan* plan) {
  int64_t most = 0;
  int multiprocessors = 0, cooperative = 0, optin = 0;
  if (const cudaError_t err = capacity<S, T>(&most, &multiprocessors, &cooperative, &optin); err != cudaSuccess) {
    return err;
  }
  // The resident trace is in the accumulation type, beside the static scratch.
  const bool fits = static_cast<int64_t>(sizeof(T)) * s.OUT * s.IN <= optin - 1024;
  int64_t parts = 1;
  if (requested_parts > 0) {
    parts = requested_parts;
  } else if (!(fits && requested_resident != 0) && cooperative && s.B < multiprocessors) {
    const int64_t by_rows = (s.OUT + kWarps - 1) / kWarps;  // at least a warp's row each
    const int64_t by_device = most / (s.B > 0 ? s.B : 1);
    parts = by_rows < by_device ? by_rows : by_device;
    if (parts < 1) parts = 1;
  }
  if (parts > 1 && (!cooperative || s.B * parts > most || parts > 65535)) return cudaErrorInvalidValue;
  if (requested_resident == 1 && (parts > 1 || !fits)) return cudaErrorInvalidValue;
  plan->parts = parts;
  plan->resident = parts == 1 && fits && requested_resident != 0;
  return cudaSuccess;
}

template <typename Params>
cudaError_t launch(void (*kernel)(Params), const PlasticPlan& plan, int64_t B, size_t shared_bytes, Params params,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(plan.parts));
  if (shared_bytes > 48 * 1024) {
    if (const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
        err != cudaSuccess) {
      return err;
    }
  }
  if (plan.parts > 1) {
    void* args[] = {&params};
    return cudaLaunchCooperativeKernel(kernel, grid, dim3(kPlasticThreads), args, shared_bytes, stream);
  }
  kernel<<<grid, kPlasticThreads, shared_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t forward(const PlasticShape& s, const PlasticForwardArgs& a, const PlasticPlan& plan, cudaStream_t stream) {
  if (s.B == 0) return cudaSuccess;
  Forward<S, T> k{layer<S, T>(s, a.x, a.y0, a.state, a.modulation, a.mod_fanout), plan.resident, in<S>(a.weight),
                  in<S>(a.alpha), in<S>(a.eta), in<S>(a.bias), in<S>(a.drive), in<T>(a.hebb), in<S>(a.mod_weight),
                  in<S>(a.mod_bias), out<T>(a.trace), out<T>(a.checkpoints), out<T>(a.activity), out<T>(a.state),
                  out<S>(a.output)};
  const size_t shared = plan.resident ? sizeof(T) * static_cast<size_t>(s.OUT * s.IN) : 0;
  return launch(forward_kernel<S, T>, plan, s.B, shared, k, stream);
}

template <typename S, typename T>
cudaError_t backward(const PlasticShape& s, const PlasticBackwardArgs& a, const PlasticPlan& plan,
                     cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return cudaSuccess;
  Backward<S, T> k{layer<S, T>(s, a.x, a.y0, a.output, a.modulation, a.mod_fanout), in<S>(a.weight),
                   in<S>(a.alpha), in<S>(a.eta), in<S>(a.grad_output), in<T>(a.activity), in<S>(a.mod_weight),
                   in<T>(a.checkpoints), in<T>(a.hebb_final), in<T>(a.grad_hebb_in), out<T>(a.trace),
                   out<T>(a.segment), out<T>(a.grad_hebb), out<T>(a.grad_z), out<T>(a.grad_pre), out<S>(a.grad_mod),
                   out<T>(a.mod_rows), out<T>(a.alpha_part), out<T>(a.eta_part), out<T>(a.mod_weight_part),
                   out<T>(a.mod_bias_part), out<T>(a.mod_fanout_part), out<S>(a.grad_z_out), out<S>(a.grad_pre_out)};
  return launch(backward_kernel<S, T>, PlasticPlan{plan.parts, false}, s.B, 0, k, stream);
}

template <typename S, typename T>
cudaError_t reduce(const PlasticShape& s, const PlasticReduceArgs& a, int64_t parts, cudaStream_t stream) {
  Reduce<S, T> k{s, parts, in<S>(a.x), in<S>(a.y0), in<T>(a.output), in<T>(a.grad_z), in<T>(a.alpha_part),
                 in<T>(a.eta_part), in<T>(a.mod_weight_part), in<T>(a.mod_bias_part), in<T>(a.mod_fanout_part),
                 out<S>(a.grad_weight), out<S>(a.grad_bias), out<S>(a.grad_alpha), out<S>(a.grad_eta),
                 out<S>(a.grad_mod_weight), out<S>(a.grad_mod_bias), out<S>(a.grad_mod_fanout)};
  const dim3 grid(static_cast<unsigned>(ceil_div(s.IN > 0 ? s.IN : 1, kTile)),
                  static_cast<unsigned>(ceil_div(s.OUT > 0 ? s.OUT : 1, kTile)));
  reduce_kernel<S, T><<<grid, dim3(kTile, kTile), 0, stream>>>(k);
  return cudaGetLastError();
}

}  // namespace

// The kernels of each caller's type, with its accumulation type.
#define NF_PLASTIC_DISPATCH(dtype, FN, ...)                               \
  switch (dtype) {                                                        \
    case DType::kFloat32: return FN<float, float>(__VA_ARGS__);           \
    case DType::kFloat64: return FN<double, double>(__VA_ARGS__);         \
    case DType::kFloat16: return FN<__half, float>(__VA_ARGS__);          \
    case DType::kBFloat16: return FN<__nv_bfloat16, float>(__VA_ARGS__);  \
  }                                                                       \
  return cudaErrorInvalidValue;

cudaError_t plastic_plan(DType dtype, const PlasticShape& s, int64_t requested_parts, int requested_resident,
                         PlasticPlan* p) {
  NF_PLASTIC_DISPATCH(dtype, plan, s, requested_parts, requested_resident, p)
}

cudaError_t plastic_forward(DType dtype, const PlasticShape& s, const PlasticForwardArgs& a, const PlasticPlan& plan,
                            cudaStream_t stream) {
  NF_PLASTIC_DISPATCH(dtype, forward, s, a, plan, stream)
}

cudaError_t plastic_backward(DType dtype, const PlasticShape& s, const PlasticBackwardArgs& a,
                             const PlasticPlan& plan, cudaStream_t stream) {
  NF_PLASTIC_DISPATCH(dtype, backward, s, a, plan, stream)
}

cudaError_t plastic_reduce(DType dtype, const PlasticShape& s, const PlasticReduceArgs& a, int64_t parts,
                           cudaStream_t stream) {
  NF_PLASTIC_DISPATCH(dtype, reduce, s, a, parts, stream)
}

#undef NF_PLASTIC_DISPATCH

}  // namespace neuronml_fast::cuda
