#include "cpu/batch_norm.h"

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"

namespace neuronml_fast::cpu {

// Derivation (per channel; means over the R rows; r = invstd, P(v) = v - mean(v) - x_hat*mean(v*x_hat)
// is the self-adjoint projection with d x_hat = r*P(dx) and d r = -r^2 * mean(x_hat*dx)):
//   grad_g     = gamma*r*P(u) + u_gamma*x_hat + u_beta
//   grad_x     = -gamma*r^2*K*x_hat - gamma*r^2*m1*P(u) + (u_gamma*r - gamma*r^2*mux)*P(g)
//   grad_gamma = r*R*K
// with m1 = mean(g*x_hat), mux = mean(u*x_hat), K = mean(u*g) - mean(u)*mean(g) - mux*m1.
// Expanded into  a_u*u + a_g*g + a_x*x_hat + a_1  and  b_u*u + b_x*x_hat + b_1  per channel, so the
// second pass is one fused multiply-add chain per element. Checked against autograd in float64
// (tests/test_batch_norm.py).
template <typename T>
void batch_norm_rows_double_backward(int64_t R, int64_t C, const T* u, const T* u_gamma, const T* u_beta,
                                     const T* g, const T* x, const T* gamma, const T* mean, const T* invstd,
                                     T* grad_g, T* grad_x, T* grad_gamma) {
  // Pass 1: per-channel sums of g, g*x_hat and, when u is given, u, u*x_hat, u*g. Each thread sums
  // a block of rows into its own accumulators (channels contiguous: vector loads).
  // Merged in thread order, so the result is the same on every run with the same thread count.
  constexpr int kSums = 5;
  const int threads = max_threads();
  std::vector<T> partial(static_cast<size_t>(threads) * kSums * C, T(0));
  const bool parallel = R * C > kParallelGrain;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    T* s_g = partial.data() + static_cast<size_t>(thread_id()) * kSums * C;
    T* s_gx = s_g + C;
    T* s_u = s_gx + C;
    T* s_ux = s_u + C;
    T* s_ug = s_ux + C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      const T* gi = g + i * C;
      const T* xi = x + i * C;
      if (u) {
        const T* ui = u + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T xh = (xi[c] - mean[c]) * invstd[c];
          s_g[c] += gi[c];
          s_gx[c] += gi[c] * xh;
          s_u[c] += ui[c];
          s_ux[c] += ui[c] * xh;
          s_ug[c] += ui[c] * gi[c];
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T xh = (xi[c] - mean[c]) * invstd[c];
          s_g[c] += gi[c];
          s_gx[c] += gi[c] * xh;
        }
      }
    }
  }
  std::vector<T> sums(kSums * C, T(0));
  for (int t = 0; t < threads; ++t)
    for (int64_t k = 0; k < kSums * C; ++k) sums[k] += partial[static_cast<size_t>(t) * kSums * C + k];

  // Per-channel coefficients.
  std::vector<T> a_u(C), a_g(C), a_x(C), a_1(C), b_u(C), b_x(C), b_1(C);
  const T inv_rows = R > 0 ? T(1) / T(R) : T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T g_bar = sums[c] * inv_rows, m1 = sums[C + c] * inv_rows;
    const T u_bar = sums[2 * C + c] * inv_rows, mux = sums[3 * C + c] * inv_rows, mug = sums[4 * C + c] * inv_rows;
    const T ug = u_gamma ? u_gamma[c] : T(0), ub = u_beta ? u_beta[c] : T(0);
    const T r = invstd[c], gr = gamma[c] * r, gr2 = gr * r;
    const T K = mug - u_bar * g_bar - mux * m1;
    a_u[c] = -gr2 * m1;
    a_g[c] = ug * r - gr2 * mux;
    a_x[c] = -gr2 * K + T(2) * gr2 * m1 * mux - ug * r * m1;
    a_1[c] = gr2 * m1 * u_bar - a_g[c] * g_bar;
    b_u[c] = gr;
    b_x[c] = ug - gr * mux;
    b_1[c] = ub - gr * u_bar;
    grad_gamma[c] = r * T(R) * K;
  }

  // Pass 2: the two full-size gradients, one fused expression per element.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < R; ++i) {
    const T* gi = g + i * C;
    const T* xi = x + i * C;
    T* dgi = grad_g + i * C;
    T* dxi = grad_x + i * C;
    if (u) {
      const T* ui = u + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xi[c] - mean[c]) * invstd[c];
        dxi[c] = a_u[c] * ui[c] + a_g[c] * gi[c] + a_x[c] * xh + a_1[c];
        dgi[c] = b_u[c] * ui[c] + b_x[c] * xh + b_1[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xi[c] - mean[c]) * invstd[c];
        dxi[c] = a_g[c] * gi[c] + a_x[c] * xh + a_1[c];
        dgi[c] = b_x[c] * xh + b_1[c];
      }
    }
  }
}

template void batch_norm_rows_double_backward<float>(int64_t, int64_t, const float*, const float*, const float*,
                                                     const float*, const float*, const float*, const float*,
                                                     const float*, float*, float*, float*);
template void batch_norm_rows_double_backward<double>(int64_t, int64_t, const double*, const double*, const double*,
                                                      const double*, const double*, const double*, const double*,
                                                      const double*, double*, double*, double*);

}  // namespace neuronml_fast::cpu
