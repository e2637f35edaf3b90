#include "cpu/plastic.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

namespace {

// tanh from one double-precision exp. Why: glibc's tanhf goes through expm1f and took a third
// of the forward's time (16 ns a call on the 2-core VM, this: 7 ns). Rounded to float this is
// the correctly rounded tanh (checked on every 97th float; glibc's tanhf is up to 2 ulp off):
// (e - 1) / (e + 1) loses at most ~1e-12 relative for |z| >= 1e-4, below that the series
// z - z^3/3 is exact to float precision; tanh(z) rounds to +-1 for |z| > 9.01.
inline float tanh_of(float z) {
  const double d = z;
  if (std::fabs(d) < 1e-4) return static_cast<float>(d * (1.0 - d * d / 3.0));
  if (std::fabs(d) > 20.0) return z > 0.f ? 1.f : -1.f;
  const double e = std::exp(2.0 * d);
  return static_cast<float>((e - 1.0) / (e + 1.0));
}
inline double tanh_of(double z) { return std::tanh(z); }

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

// sum_i (w[i] + alpha_i * h[r][i]) * p[r][i] for R rows of one neuron (the same w and alpha
// rows, R sequences). Why R rows at once: a row's dot product is one chain of dependent FMAs
// and its tanh and trace update wait for it; R independent chains (R = 4 on the 2-core VM:
// 18.8 -> 13.7 ms for B=16, N=256, T=100 in isolation) keep the FMA units busy, and the w and
// alpha loads are shared. Each row sums kChains / R interleaved vectors, so R = 1 (B = 1:
// Miconi's single sequence) still has independent chains.
template <typename T, int R, bool kScalar>
void dot_rows(const T* w, const T* alpha, T* const* h, const T* const* p, int64_t n, T* z) {
  constexpr int kVector = 32 / sizeof(T), kChains = 4, kWidth = kVector * (kChains / R > 0 ? kChains / R : 1);
  T part[R][kWidth] = {};
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T* hr = h[r] + i;
      const T* pr = p[r] + i;
#pragma omp simd
      for (int l = 0; l < kWidth; ++l) part[r][l] += (w[i + l] + (kScalar ? alpha[0] : alpha[i + l]) * hr[l]) * pr[l];
    }
  }
  for (int r = 0; r < R; ++r) {
    T sum = T(0);
    for (int64_t k = i; k < n; ++k) sum += (w[k] + (kScalar ? alpha[0] : alpha[k]) * h[r][k]) * p[r][k];
    for (int l = 0; l < kWidth; ++l) sum += part[r][l];
    z[r] = sum;
  }
}

// R forward rows of neuron j, sequences b0 .. b0+R-1: z, y and the in-place trace update of each
// row (the row still in L1). Writes y to output.
template <typename T, int R>
void forward_rows(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* bias,
                  const T* drive, const T* modulation, const T* y0, const T* zeros, T* hebb, T* output, int64_t t, int64_t b0, int64_t j) {
  const int64_t I = s.IN;
  T* h[R];
  const T* p[R];
  for (int r = 0; r < R; ++r) {
    h[r] = hebb + ((b0 + r) * s.OUT + j) * I;
    p[r] = pre_of(s, x, y0, static_cast<const T*>(output), zeros, t, b0 + r);  // rnn: step t-1's output
  }
  T z[R];
  if (s.alpha_scalar) dot_rows<T, R, true>(weight + j * I, alpha, h, p, I, z);
  else dot_rows<T, R, false>(weight + j * I, alpha + j * I, h, p, I, z);
  for (int r = 0; r < R; ++r) {
    const int64_t row = (t * s.B + b0 + r) * s.OUT + j;
    if (s.recurrent) {
      z[r] += x[row];
    } else {
      if (bias) z[r] += bias[j];
      if (drive) z[r] += drive[row];
    }
    const T y = s.tanh ? tanh_of(z[r]) : z[r];
    const T m = s.rule == PlasticRule::kModulated ? modulation_of(s, modulation, t, b0 + r, j) : T(0);
    update_row(s, h[r], p[r], y, eta, m, I);
    output[row] = y;
  }
}

// Sequences per row group. Forward: see dot_rows. Backward (B=16 N=256 T=100, 2-core VM): 1 / 2 /
// 3 / 4 rows per group took 30.7 / 30.0 / 31.2 / 35.5 ms; its per-row state spills registers
// beyond 2.
constexpr int kForwardGroup = 4;
constexpr int kBackwardGroup = 2;
static_assert(kForwardGroup <= 4 && kBackwardGroup <= 4, "with_row_count instantiates groups of 1 to 4");

// Calls f(std::integral_constant<int, R>{}) with R = count (1 .. 4): the row groups are
// templates on their size, so their per-row arrays live in registers.
template <typename F>
void with_row_count(int64_t count, F&& f) {
  switch (count) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
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
    // Rows are independent within a step: parallel over (neuron, group of sequences),
    // so B = 1 with a large N (Miconi's 1000 units) still uses every core. Neuron-major: the
    // rows of one neuron follow each other, and its weight and alpha rows are read from L1.
    const int64_t groups = (s.B + kForwardGroup - 1) / kForwardGroup;
#pragma omp parallel for schedule(static) if (trace > 4096)
    for (int64_t k = 0; k < s.OUT * groups; ++k) {
      const int64_t j = k / groups, b0 = (k % groups) * kForwardGroup;
      with_row_count(std::min<int64_t>(kForwardGroup, s.B - b0), [&](auto rows_c) {
        forward_rows<T, decltype(rows_c)::value>(s, x, weight, alpha, eta, bias, drive, modulation, y0, zeros.data(),
                                                  hebb, output, t, b0, j);
      });
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

// R rows of one neuron (sequences b0 .. b0+R-1) at one step, for the one-pass backward.
template <typename T, int R>
struct OnePassRows {
  const T* p[R];       // presynaptic activity of step t
  const T* p_prev[R];  // of step t-1 (zeros at t = 0)
  T* h[R];             // H_{t+1} in, H_t out
  T* gh[R];            // dL/dH_{t+1} in, dL/dH_t out
  T* gp[R];            // presynaptic gradient rows, added to
  T dot[R];            // <dL/dH_{t+1}, p> in, <dL/dH_t, p_prev> out
  T y[R], gy_out[R], m[R];
  T gz[R], dm[R];      // out: dL/dz and the modulation gradient of each row
};

// The rows of one neuron for the invertible rules whose rule gradient needs only <dL/dH', pre>
// (hebb and modulated, no clip), in ONE pass over the trace instead of three. `dot` was
// computed while the later step wrote gh. The pass undoes the update on the fly (H' -> H),
// uses H, writes dL/dH_t and returns the rows' next `dot`. R rows at once share the weight,
// alpha and alpha-gradient rows and give independent reduction chains (as in dot_rows).
// Returns the rows' summed eta gradient; adds the alpha gradient into ga (row j, or ga[0]).
template <typename T, PlasticRule kRule, bool kScalar, int R>
T backward_rows_one_pass(OnePassRows<T, R>& rs, T eta, bool tanh_act, const T* w, const T* alpha, T* ga,
                         int64_t n) {
  static_assert(kRule != PlasticRule::kOja, "Oja's rule gradient needs the trace itself");
  const T inv = kRule == PlasticRule::kHebb ? T(1) / (T(1) - eta) : T(1);
  const T d_h = kRule == PlasticRule::kHebb ? T(1) - eta : T(1);
  T d_p[R];
  for (int r = 0; r < R; ++r) {
    const T y = rs.y[r];
    const T dy = kRule == PlasticRule::kHebb ? eta * rs.dot[r] : rs.m[r] * rs.dot[r];
    rs.dm[r] = kRule == PlasticRule::kModulated ? y * rs.dot[r] : T(0);
    rs.gz[r] = (rs.gy_out[r] + dy) * (tanh_act ? T(1) - y * y : T(1));
    d_p[r] = kRule == PlasticRule::kHebb ? eta * y : rs.m[r] * y;
  }
  constexpr int kVector = 32 / sizeof(T);
  T geta[kVector] = {}, ga_scalar[kVector] = {}, ahead[R][kVector] = {};
  // Element i, its partial sums in lane l.
  auto element = [&](int64_t i, int l) __attribute__((always_inline)) {
    const T a = kScalar ? alpha[0] : alpha[i];
    const T wi = w[i];
    T ga_sum = T(0);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T pi = rs.p[r][i];
      const T hv = (rs.h[r][i] - d_p[r] * pi) * inv;  // H_t from H_{t+1}
      rs.h[r][i] = hv;
      const T hz = rs.gz[r] * pi;
      const T g = rs.gh[r][i];
      ga_sum += hz * hv;
      if constexpr (kRule == PlasticRule::kHebb) geta[l] += g * (rs.y[r] * pi - hv);
      rs.gp[r][i] += (wi + a * hv) * rs.gz[r] + g * d_p[r];
      const T g_new = g * d_h + a * hz;
      rs.gh[r][i] = g_new;
      ahead[r][l] += g_new * rs.p_prev[r][i];
    }
    if constexpr (kScalar) ga_scalar[l] += ga_sum; else ga[i] += ga_sum;
  };
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) {
#pragma omp simd
    for (int l = 0; l < kVector; ++l) element(i + l, l);
  }
  for (; i < n; ++i) element(i, 0);
  T eta_sum = T(0), alpha_sum = T(0);
  for (int l = 0; l < kVector; ++l) {
    eta_sum += geta[l];
    alpha_sum += ga_scalar[l];
  }
  for (int r = 0; r < R; ++r) {
    T sum = T(0);
    for (int l = 0; l < kVector; ++l) sum += ahead[r][l];
    rs.dot[r] = sum;
  }
  if constexpr (kScalar) ga[0] += alpha_sum;
  return eta_sum;
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
      // per-connection alpha gradients are summed in place, with no per-thread copies. The eta
      // and scalar-alpha sums stay in the thread's registers until its last neuron (a shared
      // per-thread array would bounce one cache line between the cores on every row).
      T* trace_t = s.recompute ? segment + (t - segment_start) * trace : hebb;
#pragma omp parallel if (trace > 4096)
      {
        const int tid = thread_id();
        T eta_sum = T(0), alpha_sum = T(0);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < O; ++j) {
          T* ga = kScalar ? &alpha_sum : grad_alpha + j * I;
          const T* w_row = weight + j * I;
          const T* a_row = kScalar ? alpha : alpha + j * I;
          T* gp_rows = pre_acc.data() + static_cast<size_t>(tid) * B * I;
          auto gy_out_of = [&](int64_t r) { return grad_output[t * rows + r] + (s.recurrent ? carry[r] : T(0)); };
          auto m_of = [&](int64_t b) {
            return kRule == PlasticRule::kModulated ? modulation_of(s, modulation, t, b, j) : T(0);
          };
          if constexpr (kRule != PlasticRule::kOja && !kClip) {
            if (one_pass) {
              for (int64_t b0 = 0; b0 < B; b0 += kBackwardGroup) {
                with_row_count(std::min<int64_t>(kBackwardGroup, B - b0), [&](auto rows_c) {
                  constexpr int R = decltype(rows_c)::value;
                  OnePassRows<T, R> rs;
                  for (int r = 0; r < R; ++r) {
                    const int64_t b = b0 + r, row = b * O + j;
                    rs.p[r] = pre_of(s, x, y0, output, zeros.data(), t, b);
                    rs.p_prev[r] = t > 0 ? pre_of(s, x, y0, output, zeros.data(), t - 1, b) : zeros.data();
                    rs.h[r] = trace_t + row * I;
                    rs.gh[r] = grad_hebb + row * I;
                    rs.gp[r] = gp_rows + b * I;
                    rs.dot[r] = dots[row];
                    rs.y[r] = output[t * rows + row];
                    rs.gy_out[r] = gy_out_of(row);
                    rs.m[r] = m_of(b);
                  }
                  eta_sum += backward_rows_one_pass<T, kRule, kScalar, R>(rs, eta, s.tanh, w_row, a_row, ga, I);
                  for (int r = 0; r < R; ++r) {
                    const int64_t row = (b0 + r) * O + j;
                    dots[row] = rs.dot[r];
                    grad_z[t * rows + row] = rs.gz[r];
                    mod_row[row] = rs.dm[r];
                  }
                });
              }
              continue;
            }
          }
          for (int64_t b = 0; b < B; ++b) {
            const int64_t r = b * O + j;
            const RowGrad<T> g = backward_row<T, kRule, kScalar, kClip>(
                pre_of(s, x, y0, output, zeros.data(), t, b), output[t * rows + r], gy_out_of(r), eta, m_of(b),
                static_cast<T>(s.clip), s.tanh, !s.recompute, w_row, a_row, trace_t + r * I, grad_hebb + r * I, ga,
                gp_rows + b * I, I);
            grad_z[t * rows + r] = g.gz;
            mod_row[r] = g.dm;
            eta_sum += g.deta;
          }
        }
        eta_acc[tid] += eta_sum;
        alpha_acc[tid] += alpha_sum;
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
