#include "cpu/plastic.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace {

// The presynaptic activity of step t for sequence b: x_t (linear) or y_{t-1} (rnn; y0 or 0 at t = 0).
template <typename T>
const T* pre_of(const PlasticShape& s, const T* x, const T* y0, const T* output, const T* zeros, int64_t t,
                int64_t b) {
  if (!s.recurrent) return x + (t * s.B + b) * s.IN;
  if (t > 0) return output + ((t - 1) * s.B + b) * s.OUT;
  return y0 ? y0 + b * s.IN : zeros;
}

template <typename T>
T modulation_of(const PlasticShape& s, const T* modulation, int64_t t, int64_t b, int64_t j) {
  return s.modulation_per_neuron ? modulation[(t * s.B + b) * s.OUT + j] : modulation[t * s.B + b];
}

// H' = rule(H) on one row (post = y_j), clipped if asked.
template <typename T>
void update_row(const PlasticShape& s, T* h, const T* p, T y, T eta, T m, int64_t n) {
  const T c = static_cast<T>(s.clip);
  switch (s.rule) {
    case PlasticRule::kHebb:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = (T(1) - eta) * h[i] + eta * y * p[i];
      break;
    case PlasticRule::kOja:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = h[i] + eta * y * (p[i] - y * h[i]);
      break;
    case PlasticRule::kModulated:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = h[i] + m * y * p[i];
      break;
  }
  if (s.has_clip) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = std::min(std::max(h[i], -c), c);
  }
}

// One forward row: z_j, y_j, and the in-place trace update of row j. Returns y_j.
template <typename T>
T forward_row(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* bias,
              const T* drive, const T* modulation, const T* p, T* h, int64_t t, int64_t b, int64_t j) {
  const int64_t I = s.IN;
  const T* w = weight + j * I;
  T z = T(0);
  if (s.alpha_scalar) {
    const T a = alpha[0];
#pragma omp simd reduction(+ : z)
    for (int64_t i = 0; i < I; ++i) z += (w[i] + a * h[i]) * p[i];
  } else {
    const T* a = alpha + j * I;
#pragma omp simd reduction(+ : z)
    for (int64_t i = 0; i < I; ++i) z += (w[i] + a[i] * h[i]) * p[i];
  }
  const int64_t row = (t * s.B + b) * s.OUT + j;
  if (s.recurrent) {
    z += x[row];
  } else {
    if (bias) z += bias[j];
    if (drive) z += drive[row];
  }
  const T y = s.tanh ? std::tanh(z) : z;
  const T m = s.rule == PlasticRule::kModulated ? modulation_of(s, modulation, t, b, j) : T(0);
  update_row(s, h, p, y, eta, m, I);
  return y;
}

}  // namespace

template <typename T>
void plastic_forward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* bias,
                     const T* drive, const T* y0, const T* modulation, T* hebb, T* output, T* checkpoints) {
  const int64_t rows = s.B * s.OUT, I = s.IN, trace = rows * I;
  const std::vector<T> zeros(I, T(0));
  for (int64_t t = 0; t < s.T; ++t) {
    if (t % s.checkpoint_every == 0) {
      std::memcpy(checkpoints + (t / s.checkpoint_every) * trace, hebb, sizeof(T) * trace);
    }
    // Rows are independent within a step: parallel over (neuron, sequence), so B = 1 with a
    // large N (Miconi's 1000 units) still uses every core. Neuron-major: the B rows of one
    // neuron follow each other, and its weight and alpha rows are read from L1 B times.
#pragma omp parallel for schedule(static) if (trace > 4096)
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t j = k / s.B, b = k % s.B, r = b * s.OUT + j;
      const T* p = pre_of(s, x, y0, output, zeros.data(), t, b);
      output[t * rows + r] = forward_row(s, x, weight, alpha, eta, bias, drive, modulation, p, hebb + r * I, t, b, j);
    }
  }
}

namespace {

// Undo one (unclipped) update of a row in place: H' -> H.
template <typename T>
void reconstruct_row(PlasticRule rule, T* h, const T* p, T y, T eta, T m, int64_t n) {
  switch (rule) {
    case PlasticRule::kHebb: {
      const T inv = T(1) / (T(1) - eta);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = (h[i] - eta * y * p[i]) * inv;
      break;
    }
    case PlasticRule::kOja: {
      const T inv = T(1) / (T(1) - eta * y * y);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = (h[i] - eta * y * p[i]) * inv;
      break;
    }
    case PlasticRule::kModulated:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = h[i] - m * y * p[i];
      break;
  }
}

template <bool B> using Bool = std::integral_constant<bool, B>;
template <PlasticRule R> using Rule = std::integral_constant<PlasticRule, R>;

// Calls fn(Rule<...>{}, Bool<alpha_scalar>{}, Bool<clip>{}) with compile-time flags, so the row
// loops below are free of branches and vectorize.
template <typename Fn>
void dispatch_rule(PlasticRule rule, bool alpha_scalar, bool clip, Fn&& fn) {
  auto with_clip = [&](auto r, auto a) { clip ? fn(r, a, Bool<true>{}) : fn(r, a, Bool<false>{}); };
  auto with_alpha = [&](auto r) { alpha_scalar ? with_clip(r, Bool<true>{}) : with_clip(r, Bool<false>{}); };
  switch (rule) {
    case PlasticRule::kHebb: with_alpha(Rule<PlasticRule::kHebb>{}); break;
    case PlasticRule::kOja: with_alpha(Rule<PlasticRule::kOja>{}); break;
    case PlasticRule::kModulated: with_alpha(Rule<PlasticRule::kModulated>{}); break;
  }
}

template <typename T>
struct RowGrad {
  T gz, dm, deta;
};

// One row (sequence b, neuron j) of step t, in reverse. h holds H_{t+1} (or, when recomputing,
// H_t from the segment) and leaves holding H_t; gh holds dL/dH_{t+1} and leaves holding
// dL/dH_t. Adds into ga (alpha) and gp (presynaptic activity).
template <typename T, PlasticRule kRule, bool kScalar, bool kClip>
RowGrad<T> backward_row(const T* p, T y, T gy_out, T eta, T m, T c, bool tanh_act, bool reconstruct, const T* w,
                        const T* alpha, T* h, T* gh, T* ga, T* gp, int64_t n) {
  if (reconstruct) reconstruct_row(kRule, h, p, y, eta, m, n);
  // First pass: the clip mask on dL/dH', and the rule's share of dL/dy_j (and dL/dM_j).
  T dy = T(0), dm = T(0);
#pragma omp simd reduction(+ : dy, dm)
  for (int64_t i = 0; i < n; ++i) {
    T g = gh[i];
    if constexpr (kClip) {
      T next;
      if constexpr (kRule == PlasticRule::kHebb) next = (T(1) - eta) * h[i] + eta * y * p[i];
      else if constexpr (kRule == PlasticRule::kOja) next = h[i] + eta * y * (p[i] - y * h[i]);
      else next = h[i] + m * y * p[i];
      g = (next < -c || next > c) ? T(0) : g;  // no gradient through a clamped element
      gh[i] = g;
    }
    if constexpr (kRule == PlasticRule::kHebb) dy += g * eta * p[i];
    else if constexpr (kRule == PlasticRule::kOja) dy += g * eta * (p[i] - T(2) * y * h[i]);
    else {
      dy += g * m * p[i];
      dm += g * y * p[i];
    }
  }
  const T gy = gy_out + dy;
  const T gz = gy * (tanh_act ? T(1) - y * y : T(1));
  // Second pass (the row is in cache): dL/dH_t, alpha, eta and the presynaptic gradient.
  T geta = T(0), ga_scalar = T(0);
  const T a0 = kScalar ? alpha[0] : T(0);
#pragma omp simd reduction(+ : geta, ga_scalar)
  for (int64_t i = 0; i < n; ++i) {
    const T a = kScalar ? a0 : alpha[i];
    const T hz = gz * p[i];
    const T g = gh[i];
    if constexpr (kScalar) ga_scalar += hz * h[i]; else ga[i] += hz * h[i];
    T d_h, d_p;
    if constexpr (kRule == PlasticRule::kHebb) {
      d_h = T(1) - eta, d_p = eta * y;
      geta += g * (y * p[i] - h[i]);
    } else if constexpr (kRule == PlasticRule::kOja) {
      d_h = T(1) - eta * y * y, d_p = eta * y;
      geta += g * y * (p[i] - y * h[i]);
    } else {
      d_h = T(1), d_p = m * y;
    }
    gp[i] += (w[i] + a * h[i]) * gz + g * d_p;
    gh[i] = g * d_h + a * hz;
  }
  if constexpr (kScalar) ga[0] += ga_scalar;
  return {gz, dm, geta};
}

// The same row for the invertible rules whose rule gradient needs only <dL/dH', pre> (hebb and
// modulated, no clip), in ONE pass over the trace instead of three. `dot` = sum_i gh[i] * p[i],
// computed while the previous (later) step wrote gh. The pass undoes the update on the fly
// (H' -> H), uses H, writes dL/dH_t, and returns sum_i dL/dH_t[i] * p_prev[i]: the `dot` of
// this row at step t-1 (p_prev: that step's presynaptic activity; zeros at t = 0).
template <typename T, PlasticRule kRule, bool kScalar>
RowGrad<T> backward_row_one_pass(const T* p, const T* p_prev, T dot, T y, T gy_out, T eta, T m, bool tanh_act,
                                 const T* w, const T* alpha, T* h, T* gh, T* ga, T* gp, int64_t n, T* next_dot) {
  static_assert(kRule != PlasticRule::kOja, "Oja's rule gradient needs the trace itself");
  const T dy = kRule == PlasticRule::kHebb ? eta * dot : m * dot;
  const T dm = kRule == PlasticRule::kModulated ? y * dot : T(0);
  const T gz = (gy_out + dy) * (tanh_act ? T(1) - y * y : T(1));
  const T inv = kRule == PlasticRule::kHebb ? T(1) / (T(1) - eta) : T(1);
  const T d_h = kRule == PlasticRule::kHebb ? T(1) - eta : T(1);
  const T d_p = kRule == PlasticRule::kHebb ? eta * y : m * y;
  const T a0 = kScalar ? alpha[0] : T(0);
  T geta = T(0), ga_scalar = T(0), ahead = T(0);
#pragma omp simd reduction(+ : geta, ga_scalar, ahead)
  for (int64_t i = 0; i < n; ++i) {
    const T hv = (h[i] - d_p * p[i]) * inv;  // H_t from H_{t+1}
    h[i] = hv;
    const T a = kScalar ? a0 : alpha[i];
    const T hz = gz * p[i];
    const T g = gh[i];
    if constexpr (kScalar) ga_scalar += hz * hv; else ga[i] += hz * hv;
    if constexpr (kRule == PlasticRule::kHebb) geta += g * (y * p[i] - hv);
    gp[i] += (w[i] + a * hv) * gz + g * d_p;
    const T g_new = g * d_h + a * hz;
    gh[i] = g_new;
    ahead += g_new * p_prev[i];
  }
  if constexpr (kScalar) ga[0] += ga_scalar;
  *next_dot = ahead;
  return {gz, dm, geta};
}

}  // namespace

template <typename T>
void plastic_backward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* y0,
                      const T* modulation, const T* output, const T* grad_output, const T* checkpoints, T* hebb,
                      T* grad_hebb, T* grad_z, T* grad_pre, T* grad_y0, T* grad_alpha, T* grad_eta,
                      T* grad_modulation, T* segment) {
  const int64_t B = s.B, O = s.OUT, I = s.IN, rows = B * O, trace = rows * I;
  const int64_t alpha_size = s.alpha_scalar ? 1 : O * I;
  const int threads = max_threads();
  const std::vector<T> zeros(I, T(0));
  std::vector<T> carry(rows, T(0));  // rnn: dL/dy_t through step t+1's presynaptic input
  // Per-connection alpha: accumulated in place (a thread owns whole neurons); scalar: per thread.
  std::vector<T> alpha_acc(threads, T(0));
  if (!s.alpha_scalar) std::fill(grad_alpha, grad_alpha + alpha_size, T(0));
  std::vector<T> eta_acc(threads, T(0));
  std::vector<T> pre_acc(static_cast<size_t>(threads) * B * I);
  std::vector<T> mod_row(rows);
  int64_t segment_start = -1;
  // Hebb and modulated rules without clip, reconstructing: one pass per row and step
  // (backward_row_one_pass), carrying each row's <dL/dH, pre> from step to step.
  const bool one_pass = !s.recompute && !s.has_clip && s.rule != PlasticRule::kOja;
  std::vector<T> dots(one_pass ? rows : 0);
  if (one_pass && s.T > 0) {
#pragma omp parallel for schedule(static) if (trace > 4096)
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = pre_of(s, x, y0, output, zeros.data(), s.T - 1, r / O);
      const T* g = grad_hebb + r * I;
      T dot = T(0);
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < I; ++i) dot += g[i] * p[i];
      dots[r] = dot;
    }
  }

  for (int64_t t = s.T - 1; t >= 0; --t) {
    if (s.recompute && (segment_start < 0 || t < segment_start)) {
      // Recompute this segment's traces from its checkpoint: segment[u] = H before step start + u.
      segment_start = (t / s.checkpoint_every) * s.checkpoint_every;
      std::memcpy(segment, checkpoints + (t / s.checkpoint_every) * trace, sizeof(T) * trace);
      for (int64_t u = segment_start; u < t; ++u) {
        T* from = segment + (u - segment_start) * trace;
        T* to = from + trace;
        std::memcpy(to, from, sizeof(T) * trace);
#pragma omp parallel for schedule(static) if (trace > 4096)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = r / O, j = r % O;
          const T m = s.rule == PlasticRule::kModulated ? modulation_of(s, modulation, u, b, j) : T(0);
          update_row(s, to + r * I, pre_of(s, x, y0, output, zeros.data(), u, b), output[u * rows + r], eta, m, I);
        }
      }
    }
    if (!s.recompute && (t + 1) % s.checkpoint_every == 0 && t + 1 < s.T) {
      // Restart the reconstruction from the exact trace: rounding never compounds past a segment.
      std::memcpy(hebb, checkpoints + ((t + 1) / s.checkpoint_every) * trace, sizeof(T) * trace);
    }
    std::fill(pre_acc.begin(), pre_acc.end(), T(0));
    dispatch_rule(s.rule, s.alpha_scalar, s.has_clip, [&](auto rule_c, auto scalar_c, auto clip_c) {
      constexpr PlasticRule kRule = decltype(rule_c)::value;
      constexpr bool kScalar = decltype(scalar_c)::value;
      constexpr bool kClip = decltype(clip_c)::value;
      // Neuron-major: a thread owns whole neurons (parallel over j, the B sequences inside), so
      // their weight, alpha and alpha-gradient rows stay in L1 across the sequences, and
      // per-connection alpha gradients are summed in place, with no per-thread copies.
#pragma omp parallel for schedule(static) if (trace > 4096)
      for (int64_t j = 0; j < O; ++j) {
        const int tid = thread_id();
        for (int64_t b = 0; b < B; ++b) {
          const int64_t r = b * O + j;
          const T m = kRule == PlasticRule::kModulated ? modulation_of(s, modulation, t, b, j) : T(0);
          T* h = s.recompute ? segment + (t - segment_start) * trace + r * I : hebb + r * I;
          const T* p = pre_of(s, x, y0, output, zeros.data(), t, b);
          const T gy_out = grad_output[t * rows + r] + (s.recurrent ? carry[r] : T(0));
          T* ga = kScalar ? alpha_acc.data() + tid : grad_alpha + j * I;
          T* gp = pre_acc.data() + (static_cast<size_t>(tid) * B + b) * I;
          const T* w_row = weight + j * I;
          const T* a_row = kScalar ? alpha : alpha + j * I;
          RowGrad<T> g;
          bool done = false;
          if constexpr (kRule != PlasticRule::kOja && !kClip) {
            if (one_pass) {
              const T* p_prev = t > 0 ? pre_of(s, x, y0, output, zeros.data(), t - 1, b) : zeros.data();
              g = backward_row_one_pass<T, kRule, kScalar>(p, p_prev, dots[r], output[t * rows + r], gy_out, eta, m,
                                                           s.tanh, w_row, a_row, h, grad_hebb + r * I, ga, gp, I,
                                                           &dots[r]);
              done = true;
            }
          }
          if (!done) {
            g = backward_row<T, kRule, kScalar, kClip>(p, output[t * rows + r], gy_out, eta, m, static_cast<T>(s.clip),
                                                       s.tanh, !s.recompute, w_row, a_row, h, grad_hebb + r * I, ga,
                                                       gp, I);
          }
          grad_z[t * rows + r] = g.gz;
          mod_row[r] = g.dm;
          eta_acc[tid] += g.deta;
        }
      }
    });
    // Presynaptic gradient of step t: merge the per-thread sums.
    T* dst = s.recurrent ? (t > 0 ? carry.data() : grad_y0) : grad_pre + t * B * I;
    if (s.recurrent && t == 0 && grad_y0 == nullptr) dst = carry.data();
    for (int64_t k = 0; k < B * I; ++k) {
      T sum = T(0);
      for (int th = 0; th < threads; ++th) sum += pre_acc[static_cast<size_t>(th) * B * I + k];
      dst[k] = sum;
    }
    if (s.rule == PlasticRule::kModulated && grad_modulation != nullptr) {
      for (int64_t b = 0; b < B; ++b) {
        if (s.modulation_per_neuron) {
          for (int64_t j = 0; j < O; ++j) grad_modulation[(t * B + b) * O + j] = mod_row[b * O + j];
        } else {
          T sum = T(0);
          for (int64_t j = 0; j < O; ++j) sum += mod_row[b * O + j];
          grad_modulation[t * B + b] = sum;
        }
      }
    }
  }
  if (s.alpha_scalar) {
    T sum = T(0);
    for (int th = 0; th < threads; ++th) sum += alpha_acc[th];
    grad_alpha[0] = sum;
  }
  T sum = T(0);
  for (int th = 0; th < threads; ++th) sum += eta_acc[th];
  grad_eta[0] = sum;
  if (s.T == 0 && s.recurrent && grad_y0 != nullptr) std::fill(grad_y0, grad_y0 + B * I, T(0));
}

#define INSTANTIATE(T)                                                                                         \
  template void plastic_forward<T>(const PlasticShape&, const T*, const T*, const T*, T, const T*, const T*,    \
                                   const T*, const T*, T*, T*, T*);                                            \
  template void plastic_backward<T>(const PlasticShape&, const T*, const T*, const T*, T, const T*, const T*,   \
                                    const T*, const T*, const T*, T*, T*, T*, T*, T*, T*, T*, T*, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace neuronml_fast::cpu
