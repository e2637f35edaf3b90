#include "cuda/common.cuh"
#include "cuda/masked.h"

namespace neuronml_fast::cuda {

namespace {

constexpr int kBM = kMaskedBM, kBN = kMaskedBN, kBK = kMaskedBK, kThreads = kMaskedThreads, kTM = kMaskedTM,
              kTN = kMaskedTN;
constexpr int kThreadCols = kBN / kTN;  // threads along a tile row

template <typename T> __device__ __forceinline__ T from_acc(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

template <typename T, typename A> __device__ __forceinline__ A load(const T* p, int64_t i, bool ok) {
  return ok ? to_acc<A>(p[i]) : A(0);
}

// Shared register-tile GEMM step: acc[i][j] += sum_k As[k][row_i] * Bs[k][col_j].
template <typename A>
__device__ __forceinline__ void mma_tile(const A (&As)[kBK][kBM], const A (&Bs)[kBK][kBN], A (&acc)[kTM][kTN],
                                         int ty, int tx) {
#pragma unroll
  for (int k = 0; k < kBK; ++k) {
    A a[kTM], b[kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i) a[i] = As[k][ty * kTM + i];
#pragma unroll
    for (int j = 0; j < kTN; ++j) b[j] = Bs[k][tx * kTN + j];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
  }
}

// ---- forward: rows = output pixels (n, ho, wo), cols = slots of (task, group) v ----------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
conv_forward_kernel(ConvShape s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ mask,
                    const T* __restrict__ bias, const int32_t* __restrict__ order, const int32_t* __restrict__ count,
                    T* __restrict__ out, T* __restrict__ pre, int64_t z0) {
  __shared__ A As[kBK][kBM];
  __shared__ A Bs[kBK][kBN];
  __shared__ int64_t channel[kBN];
  const int tid = threadIdx.x, ty = tid / kThreadCols, tx = tid % kThreadCols;
  const int64_t v = z0 + blockIdx.z, t = v / s.G, g = v % s.G;
  const int64_t pixels = s.N * s.HO * s.WO, K = s.CIN_G * s.KH * s.KW;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int active = count[v];
  if (tid < kBN) {
    const int64_t slot = n0 + tid;
    channel[tid] = slot < s.COUT_G ? g * s.COUT_G + order[v * s.COUT_G + slot] : -1;
  }
  __syncthreads();
  A acc[kTM][kTN] = {};
  if (n0 < active) {  // blocks of pruned neurons skip the GEMM and only write zeros
    for (int64_t k0 = 0; k0 < K; k0 += kBK) {
      for (int e = tid; e < kBK * kBM; e += kThreads) {
        const int kk = e / kBM, mm = e % kBM;
        const int64_t m = m0 + mm, k = k0 + kk;
        const int64_t n = m / (s.HO * s.WO), p = m % (s.HO * s.WO), ho = p / s.WO, wo = p % s.WO;
        const int64_t ci = k / (s.KH * s.KW), r = k % (s.KH * s.KW);
        const int64_t hi = ho * s.stride_h - s.pad_h + (r / s.KW) * s.dil_h;
        const int64_t wi = wo * s.stride_w - s.pad_w + (r % s.KW) * s.dil_w;
        const bool ok = m < pixels && k < K && hi >= 0 && hi < s.H && wi >= 0 && wi < s.W;
        As[kk][mm] = load<T, A>(x, (((t * s.N + n) * s.CIN + g * s.CIN_G + ci) * s.H + hi) * s.W + wi, ok);
      }
      for (int e = tid; e < kBK * kBN; e += kThreads) {
        const int nn = e / kBK, kk = e % kBK;
        const int64_t k = k0 + kk;
        const bool ok = k < K && n0 + nn < active;
        Bs[kk][nn] = load<T, A>(w, (t * s.COUT + (ok ? channel[nn] : 0)) * K + k, ok);
      }
      __syncthreads();
      mma_tile(As, Bs, acc, ty, tx);
      __syncthreads();
    }
  }
#pragma unroll
  for (int j = 0; j < kTN; ++j) {
    const int nn = tx * kTN + j;
    const int64_t oc = channel[nn];
    if (oc < 0) continue;
    const bool on = n0 + nn < active;
    const A m = on ? to_acc<A>(mask[t * s.COUT + oc]) : A(0);
    const A b = (on && bias != nullptr) ? to_acc<A>(bias[t * s.COUT + oc]) : A(0);
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t mpix = m0 + ty * kTM + i;
      if (mpix >= pixels) continue;
      const int64_t n = mpix / (s.HO * s.WO), p = mpix % (s.HO * s.WO);
      const int64_t offset = ((t * s.N + n) * s.COUT + oc) * (s.HO * s.WO) + p;
      const A value = on ? acc[i][j] + b : A(0);
      pre[offset] = from_acc<T>(value);
      out[offset] = from_acc<T>(on ? m * value : A(0));
    }
  }
}

template <typename T, typename A>
__device__ __forceinline__ A grad_y(const T* go, const T* gp, int64_t offset, A m) {
  A v = to_acc<A>(go[offset]) * m;
  if (gp != nullptr) v += to_acc<A>(gp[offset]);
  return v;
}

// ---- grad input: rows = input pixels (n, h, w), cols = input channels of group g --------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
conv_input_grad_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ gp, const T* __restrict__ w,
                       const T* __restrict__ mask, const int32_t* __restrict__ order,
                       const int32_t* __restrict__ count, T* __restrict__ gx, int64_t z0) {
  __shared__ A As[kBK][kBM];
  __shared__ A Bs[kBK][kBN];
  const int tid = threadIdx.x, ty = tid / kThreadCols, tx = tid % kThreadCols;
  const int64_t v = z0 + blockIdx.z, t = v / s.G, g = v % s.G;
  const int64_t pixels = s.N * s.H * s.W, taps = s.KH * s.KW;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t K = static_cast<int64_t>(count[v]) * taps;  // active slots x taps
  A acc[kTM][kTN] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, mm = e % kBM;
      const int64_t m = m0 + mm, k = k0 + kk;
      const int64_t n = m / (s.H * s.W), q = m % (s.H * s.W), h = q / s.W, x = q % s.W;
      const int64_t j = k / taps, r = k % taps;
      const int64_t hn = h + s.pad_h - (r / s.KW) * s.dil_h, wn = x + s.pad_w - (r % s.KW) * s.dil_w;
      const int64_t ho = hn / s.stride_h, wo = wn / s.stride_w;
      const bool ok = m < pixels && k < K && hn >= 0 && wn >= 0 && hn % s.stride_h == 0 && wn % s.stride_w == 0 &&
                      ho < s.HO && wo < s.WO;
      A value = A(0);
      if (ok) {
        const int64_t oc = g * s.COUT_G + order[v * s.COUT_G + j];
        const int64_t offset = ((t * s.N + n) * s.COUT + oc) * (s.HO * s.WO) + ho * s.WO + wo;
        value = grad_y<T, A>(go, gp, offset, to_acc<A>(mask[t * s.COUT + oc]));
      }
      As[kk][mm] = value;
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int kk = e / kBN, nn = e % kBN;
      const int64_t k = k0 + kk, ci = c0 + nn;
      const bool ok = k < K && ci < s.CIN_G;
      A value = A(0);
      if (ok) {
        const int64_t oc = g * s.COUT_G + order[v * s.COUT_G + k / taps];
        value = to_acc<A>(w[((t * s.COUT + oc) * s.CIN_G + ci) * taps + k % taps]);
      }
      Bs[kk][nn] = value;
    }
    __syncthreads();
    mma_tile(As, Bs, acc, ty, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty * kTM + i;
    if (m >= pixels) continue;
    const int64_t n = m / (s.H * s.W), q = m % (s.H * s.W);
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t ci = c0 + tx * kTN + j;
      if (ci < s.CIN_G) gx[((t * s.N + n) * s.CIN + g * s.CIN_G + ci) * (s.H * s.W) + q] = from_acc<T>(acc[i][j]);
    }
  }
}

// ---- grad weight (+ bias and mask): rows = slots, cols = (ci, kh, kw), reduced over pixels ----
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
conv_weight_grad_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ gp, const T* __restrict__ pre,
                        const T* __restrict__ x, const T* __restrict__ mask, const int32_t* __restrict__ order,
                        const int32_t* __restrict__ count, int64_t splits, int64_t per_split, A* __restrict__ gw,
                        A* __restrict__ gb, A* __restrict__ gm, int64_t z0) {
  __shared__ A As[kBK][kBM];  // gy^T tile: [pixels][slots]
  __shared__ A Bs[kBK][kBN];  // x patches: [pixels][cols]
  __shared__ int64_t channel[kBM];
  __shared__ A slot_mask[kBM];
  const int tid = threadIdx.x, ty = tid / kThreadCols, tx = tid % kThreadCols;
  const int64_t z = z0 + blockIdx.z, v = z / splits, split = z % splits, t = v / s.G, g = v % s.G;
  const int64_t taps = s.KH * s.KW, K = s.CIN_G * taps, pixels = s.N * s.HO * s.WO;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBM, c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int active = count[v];
  const int64_t start = split * per_split, stop = min(start + per_split, pixels);
  if (tid < kBM) {
    const int64_t slot = j0 + tid;
    channel[tid] = slot < s.COUT_G ? g * s.COUT_G + order[v * s.COUT_G + slot] : -1;
    slot_mask[tid] = slot < active ? to_acc<A>(mask[t * s.COUT + channel[tid]]) : A(0);
  }
  __syncthreads();
  A acc[kTM][kTN] = {};
  const bool compute = gw != nullptr && j0 < active;
  for (int64_t p0 = start; compute && p0 < stop; p0 += kBK) {
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, mm = e % kBM;
      const int64_t m = p0 + kk;
      const bool ok = m < stop && j0 + mm < active;
      A value = A(0);
      if (ok) {
        const int64_t n = m / (s.HO * s.WO), p = m % (s.HO * s.WO);
        value = grad_y<T, A>(go, gp, ((t * s.N + n) * s.COUT + channel[mm]) * (s.HO * s.WO) + p, slot_mask[mm]);
      }
      As[kk][mm] = value;
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int kk = e / kBN, nn = e % kBN;
      const int64_t m = p0 + kk, col = c0 + nn;
      const int64_t n = m / (s.HO * s.WO), p = m % (s.HO * s.WO), ho = p / s.WO, wo = p % s.WO;
      const int64_t ci = col / taps, r = col % taps;
      const int64_t hi = ho * s.stride_h - s.pad_h + (r / s.KW) * s.dil_h;
      const int64_t wi = wo * s.stride_w - s.pad_w + (r % s.KW) * s.dil_w;
      const bool ok = m < stop && col < K && hi >= 0 && hi < s.H && wi >= 0 && wi < s.W;
      Bs[kk][nn] = load<T, A>(x, (((t * s.N + n) * s.CIN + g * s.CIN_G + ci) * s.H + hi) * s.W + wi, ok);
    }
    __syncthreads();
    mma_tile(As, Bs, acc, ty, tx);
    __syncthreads();
  }
  if (gw != nullptr) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t oc = channel[ty * kTM + i];
      if (oc < 0) continue;
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t col = c0 + tx * kTN + j;
        if (col < K) gw[((split * s.T + t) * s.COUT + oc) * K + col] = acc[i][j];
      }
    }
  }
  if (blockIdx.y == 0 && tid < kBM && channel[tid] >= 0) {  // bias and mask gradients of this split
    A sum_gy = A(0), sum_mask = A(0);
    if (j0 + tid < active) {
      const int64_t oc = channel[tid];
      for (int64_t m = start; m < stop; ++m) {
        const int64_t n = m / (s.HO * s.WO), p = m % (s.HO * s.WO);
        const int64_t offset = ((t * s.N + n) * s.COUT + oc) * (s.HO * s.WO) + p;
        sum_gy += grad_y<T, A>(go, gp, offset, slot_mask[tid]);
        if (pre != nullptr) sum_mask += to_acc<A>(go[offset]) * to_acc<A>(pre[offset]);
      }
    }
    gb[(split * s.T + t) * s.COUT + channel[tid]] = sum_gy;
    gm[(split * s.T + t) * s.COUT + channel[tid]] = sum_mask;
  }
}

// Grid z runs over (task, group[, split]), which can exceed the 65535 blocks a grid's y and z hold
// (4 tasks x 256 depthwise groups x 64 splits): launch it in chunks of the device's limit, each
// kernel offsetting its blockIdx.z by z0.
template <typename Launch>
cudaError_t launch_z_chunks(dim3 grid, int64_t z_total, Launch launch) {
  if (grid.x == 0 || grid.y == 0 || z_total == 0) return cudaSuccess;
  int device = 0, max_z = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_z, cudaDevAttrMaxGridDimZ, device);
  for (int64_t z0 = 0; err == cudaSuccess && z0 < z_total; z0 += max_z) {
    grid.z = static_cast<unsigned>(z_total - z0 < max_z ? z_total - z0 : max_z);
    launch(grid, z0);
    err = cudaGetLastError();
  }
  return err;
}

template <typename T>
cudaError_t forward(const ConvShape& s, const void* x, const void* w, const void* mask, const void* bias,
                    const int32_t* order, const int32_t* count, void* out, void* pre, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 grid(ceil_div(s.N * s.HO * s.WO, kBM), ceil_div(s.COUT_G, kBN));
  return launch_z_chunks(grid, s.T * s.G, [&](dim3 chunk, int64_t z0) {
    conv_forward_kernel<T, A><<<chunk, kThreads, 0, stream>>>(
        s, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(mask),
        static_cast<const T*>(bias), order, count, static_cast<T*>(out), static_cast<T*>(pre), z0);
  });
}

template <typename T>
cudaError_t input_grad(const ConvShape& s, const void* go, const void* gp, const void* w, const void* mask,
                       const int32_t* order, const int32_t* count, void* gx, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 grid(ceil_div(s.N * s.H * s.W, kBM), ceil_div(s.CIN_G, kBN));
  return launch_z_chunks(grid, s.T * s.G, [&](dim3 chunk, int64_t z0) {
    conv_input_grad_kernel<T, A><<<chunk, kThreads, 0, stream>>>(
        s, static_cast<const T*>(go), static_cast<const T*>(gp), static_cast<const T*>(w),
        static_cast<const T*>(mask), order, count, static_cast<T*>(gx), z0);
  });
}

template <typename T>
cudaError_t weight_grad(const ConvShape& s, const void* go, const void* gp, const void* pre, const void* x,
                        const void* mask, const int32_t* order, const int32_t* count, int64_t splits,
                        int64_t per_split, void* gw, void* gb, void* gm, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t K = s.CIN_G * s.KH * s.KW;
  const dim3 grid(ceil_div(s.COUT_G, kBM), gw != nullptr ? ceil_div(K, kBN) : 1);
  return launch_z_chunks(grid, s.T * s.G * splits, [&](dim3 chunk, int64_t z0) {
    conv_weight_grad_kernel<T, A><<<chunk, kThreads, 0, stream>>>(
        s, static_cast<const T*>(go), static_cast<const T*>(gp), static_cast<const T*>(pre), static_cast<const T*>(x),
        static_cast<const T*>(mask), order, count, splits, per_split, static_cast<A*>(gw), static_cast<A*>(gb),
        static_cast<A*>(gm), z0);
  });
}

}  // namespace

#define NF_DISPATCH(dtype, FN, ...)                                        \
  switch (dtype) {                                                         \
    case DType::kFloat32: return FN<float>(__VA_ARGS__);                   \
    case DType::kFloat64: return FN<double>(__VA_ARGS__);                  \
    case DType::kFloat16: return FN<__half>(__VA_ARGS__);                  \
    case DType::kBFloat16: return FN<__nv_bfloat16>(__VA_ARGS__);          \
  }                                                                        \
  return cudaErrorInvalidValue;

cudaError_t masked_conv_forward(DType dtype, const ConvShape& s, const void* x, const void* weight,
                                const void* mask, const void* bias, const int32_t* order, const int32_t* count,
                                void* out, void* pre, cudaStream_t stream) {
  NF_DISPATCH(dtype, forward, s, x, weight, mask, bias, order, count, out, pre, stream)
}

cudaError_t masked_conv_input_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                   const void* weight, const void* mask, const int32_t* order,
                                   const int32_t* count, void* grad_input, cudaStream_t stream) {
  NF_DISPATCH(dtype, input_grad, s, grad_out, grad_pre, weight, mask, order, count, grad_input, stream)
}

cudaError_t masked_conv_weight_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                    const void* pre, const void* x, const void* mask, const int32_t* order,
                                    const int32_t* count, int64_t splits, int64_t pixels_per_split,
                                    void* grad_weight_part, void* grad_bias_part, void* grad_mask_part,
                                    cudaStream_t stream) {
  NF_DISPATCH(dtype, weight_grad, s, grad_out, grad_pre, pre, x, mask, order, count, splits, pixels_per_split,
              grad_weight_part, grad_bias_part, grad_mask_part, stream)
}

#undef NF_DISPATCH

}  // namespace neuronml_fast::cuda
