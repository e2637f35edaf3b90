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

// ---- the active channels of a (task, group), found by each block from the mask row ---------------

constexpr int kWarps = kThreads / 32;

// Block-wide inclusive prefix sum of one value per thread, called by every thread of the block;
// `total` gets the block's sum. `warp_sums`: kWarps ints of shared scratch. Two barriers.
__device__ __forceinline__ int block_inclusive_sum(int value, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, value, d);
    if (lane >= d) value += up;
  }
  if (lane == 31) warp_sums[warp] = value;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  __syncthreads();  // warp_sums is rewritten by the next call
  return value + before;
}

// Whether channel c (within its group, mask row `mask_row`) is computed: mask != 0 under
// skip_zero, every channel otherwise.
template <typename T> __device__ __forceinline__ bool kept(const ConvShape& s, const T* mask_row, int64_t c) {
  using A = typename Acc<T>::type;
  return c >= 0 && c < s.COUT_G && (!s.skip_zero || to_acc<A>(mask_row[c]) != A(0));
}

// The output channels of compacted slots [slot0, slot0 + kSlots) of group g, slot k holding the
// group's k-th active channel: writes channel[0, kSlots) (-1 past the last active channel) and
// returns how many of the slots are active. A block-wide prefix count over the group's mask row,
// kThreads channels at a time, that stops once the slots are filled. Called by every thread; its
// result is visible to all of them on return.
template <int kSlots, typename T>
__device__ int slot_channels(const ConvShape& s, const T* mask_row, int64_t g, int64_t slot0, int64_t* channel,
                             int* warp_sums) {
  for (int i = threadIdx.x; i < kSlots; i += kThreads) channel[i] = -1;
  int64_t before = 0;  // active channels before the window
  // Runs at least once (COUT_G >= 1), so its barriers order the -1s before the channels.
  for (int64_t c0 = 0; c0 < s.COUT_G && before < slot0 + kSlots; c0 += kThreads) {
    const int64_t c = c0 + threadIdx.x;
    const bool keep = kept(s, mask_row, c);
    int total = 0;
    const int64_t rank = before + block_inclusive_sum(keep ? 1 : 0, warp_sums, total) - 1;
    if (keep && rank >= slot0 && rank < slot0 + kSlots) channel[rank - slot0] = g * s.COUT_G + c;
    before += total;
  }
  __syncthreads();
  return static_cast<int>(before - slot0 < 0 ? 0 : before - slot0 < kSlots ? before - slot0 : kSlots);
}

// ---- forward: rows = output pixels (n, ho, wo), cols = slots of (task, group) v ----------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
conv_forward_kernel(ConvShape s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ mask,
                    const T* __restrict__ bias, T* __restrict__ out, T* __restrict__ pre, int64_t z0) {
  __shared__ A As[kBK][kBM];
  __shared__ A Bs[kBK][kBN];
  __shared__ int64_t channel[kBN];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, ty = tid / kThreadCols, tx = tid % kThreadCols;
  const int64_t v = z0 + blockIdx.z, t = v / s.G, g = v % s.G;
  const int64_t pixels = s.N * s.HO * s.WO, K = s.CIN_G * s.KH * s.KW;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const T* mask_row = mask + t * s.COUT + g * s.COUT_G;
  const int active = slot_channels<kBN>(s, mask_row, g, n0, channel, warp_sums);
  A acc[kTM][kTN] = {};
  if (active > 0) {  // blocks of slots past the active count skip the GEMM
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
        const bool ok = k < K && nn < active;
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
    if (nn < active) {  // the active channel of slot n0 + nn
      const int64_t oc = channel[nn];
      const A m = to_acc<A>(mask[t * s.COUT + oc]);
      const A b = bias != nullptr ? to_acc<A>(bias[t * s.COUT + oc]) : A(0);
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int64_t mpix = m0 + ty * kTM + i;
        if (mpix >= pixels) continue;
        const int64_t n = mpix / (s.HO * s.WO), p = mpix % (s.HO * s.WO);
        const int64_t offset = ((t * s.N + n) * s.COUT + oc) * (s.HO * s.WO) + p;
        const A value = acc[i][j] + b;
        pre[offset] = from_acc<T>(value);
        out[offset] = from_acc<T>(m * value);
      }
    }
    const int64_t own = n0 + nn;  // channel n0 + nn of the group: its exact zeros if it is pruned
    if (own < s.COUT_G && !kept(s, mask_row, own)) {
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int64_t mpix = m0 + ty * kTM + i;
        if (mpix >= pixels) continue;
        const int64_t n = mpix / (s.HO * s.WO), p = mpix % (s.HO * s.WO);
        const int64_t offset = ((t * s.N + n) * s.COUT + g * s.COUT_G + own) * (s.HO * s.WO) + p;
        pre[offset] = from_acc<T>(A(0));
        out[offset] = from_acc<T>(A(0));
      }
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
// K runs over (active channel, tap), a window of kThreads channels of the group at a time: each
// window's active channels are compacted into shared memory first.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
conv_input_grad_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ gp, const T* __restrict__ w,
                       const T* __restrict__ mask, T* __restrict__ gx, int64_t z0) {
  __shared__ A As[kBK][kBM];
  __shared__ A Bs[kBK][kBN];
  __shared__ int64_t window_channel[kThreads];
  __shared__ A window_mask[kThreads];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, ty = tid / kThreadCols, tx = tid % kThreadCols;
  const int64_t v = z0 + blockIdx.z, t = v / s.G, g = v % s.G;
  const int64_t pixels = s.N * s.H * s.W, taps = s.KH * s.KW;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const T* mask_row = mask + t * s.COUT + g * s.COUT_G;
  A acc[kTM][kTN] = {};
  for (int64_t w0 = 0; w0 < s.COUT_G; w0 += kThreads) {
    const int64_t c = w0 + tid;
    const bool keep = kept(s, mask_row, c);
    int active = 0;
    const int rank = block_inclusive_sum(keep ? 1 : 0, warp_sums, active) - 1;
    if (keep) {
      window_channel[rank] = g * s.COUT_G + c;
      window_mask[rank] = to_acc<A>(mask_row[c]);
    }
    __syncthreads();
    const int64_t K = static_cast<int64_t>(active) * taps;  // active channels x taps
    // Every read of the window's lists happens before this loop's last barrier, so the next
    // window's writes (after its own barriers) cannot race with them.
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
          const int64_t offset = ((t * s.N + n) * s.COUT + window_channel[j]) * (s.HO * s.WO) + ho * s.WO + wo;
          value = grad_y<T, A>(go, gp, offset, window_mask[j]);
        }
        As[kk][mm] = value;
      }
      for (int e = tid; e < kBK * kBN; e += kThreads) {
        const int kk = e / kBN, nn = e % kBN;
        const int64_t k = k0 + kk, ci = c0 + nn;
        const bool ok = k < K && ci < s.CIN_G;
        A value = A(0);
        if (ok) value = to_acc<A>(w[((t * s.COUT + window_channel[k / taps]) * s.CIN_G + ci) * taps + k % taps]);
        Bs[kk][nn] = value;
      }
      __syncthreads();
      mma_tile(As, Bs, acc, ty, tx);
      __syncthreads();
    }
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
// Split `split` writes at offset split * split_stride of gw, gb and gm, in O: the gradients'
// dtype T when there is one split, partial sums in A for `sum_splits_kernel` otherwise.
template <typename T, typename A, typename O>
__global__ void __launch_bounds__(kThreads)
conv_weight_grad_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ gp, const T* __restrict__ pre,
                        const T* __restrict__ x, const T* __restrict__ mask, int64_t splits, int64_t per_split,
                        O* __restrict__ gw, O* __restrict__ gb, O* __restrict__ gm, int64_t split_stride, int64_t z0) {
  __shared__ A As[kBK][kBM];  // gy^T tile: [pixels][slots]
  __shared__ A Bs[kBK][kBN];  // x patches: [pixels][cols]
  __shared__ int64_t channel[kBM];
  __shared__ A slot_mask[kBM];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, ty = tid / kThreadCols, tx = tid % kThreadCols;
  const int64_t z = z0 + blockIdx.z, v = z / splits, split = z % splits, t = v / s.G, g = v % s.G;
  const int64_t taps = s.KH * s.KW, K = s.CIN_G * taps, pixels = s.N * s.HO * s.WO;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBM, c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t start = split * per_split, stop = min(start + per_split, pixels);
  const T* mask_row = mask + t * s.COUT + g * s.COUT_G;
  const int active = slot_channels<kBM>(s, mask_row, g, j0, channel, warp_sums);
  if (tid < kBM) slot_mask[tid] = tid < active ? to_acc<A>(mask[t * s.COUT + channel[tid]]) : A(0);
  __syncthreads();
  O* const gw_split = gw != nullptr ? gw + split * split_stride : nullptr;
  O* const gb_split = gb + split * split_stride;
  O* const gm_split = gm + split * split_stride;
  A acc[kTM][kTN] = {};
  const bool compute = gw != nullptr && active > 0;
  for (int64_t p0 = start; compute && p0 < stop; p0 += kBK) {
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, mm = e % kBM;
      const int64_t m = p0 + kk;
      const bool ok = m < stop && mm < active;
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
  if (gw_split != nullptr) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int slot = ty * kTM + i;
      const int64_t own = j0 + slot;  // channel j0 + slot of the group: its zeros if it is pruned
      const bool pruned = own < s.COUT_G && !kept(s, mask_row, own);
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t col = c0 + tx * kTN + j;
        if (col >= K) continue;
        if (slot < active) gw_split[(t * s.COUT + channel[slot]) * K + col] = from_acc<O>(acc[i][j]);
        if (pruned) gw_split[(t * s.COUT + g * s.COUT_G + own) * K + col] = from_acc<O>(A(0));
      }
    }
  }
  if (blockIdx.y == 0 && tid < kBM) {  // bias and mask gradients of this split
    if (tid < active) {
      const int64_t oc = channel[tid];
      A sum_gy = A(0), sum_mask = A(0);
      for (int64_t m = start; m < stop; ++m) {
        const int64_t n = m / (s.HO * s.WO), p = m % (s.HO * s.WO);
        const int64_t offset = ((t * s.N + n) * s.COUT + oc) * (s.HO * s.WO) + p;
        sum_gy += grad_y<T, A>(go, gp, offset, slot_mask[tid]);
        if (pre != nullptr) sum_mask += to_acc<A>(go[offset]) * to_acc<A>(pre[offset]);
      }
      gb_split[t * s.COUT + oc] = from_acc<O>(sum_gy);
      gm_split[t * s.COUT + oc] = from_acc<O>(sum_mask);
    }
    const int64_t own = j0 + tid;
    if (own < s.COUT_G && !kept(s, mask_row, own)) {
      gb_split[t * s.COUT + g * s.COUT_G + own] = from_acc<O>(A(0));
      gm_split[t * s.COUT + g * s.COUT_G + own] = from_acc<O>(A(0));
    }
  }
}

// The partial sums part [splits, stride] added in split order; element i of a row is the weight
// gradient's i-th (i < n_w), then the bias gradient's, then the mask gradient's.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
sum_splits_kernel(const A* __restrict__ part, int64_t splits, int64_t stride, int64_t n_w, int64_t n_b,
                  T* __restrict__ gw, T* __restrict__ gb, T* __restrict__ gm) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= stride) return;
  A sum = A(0);
  for (int64_t split = 0; split < splits; ++split) sum += part[split * stride + i];
  if (i < n_w) {
    gw[i] = from_acc<T>(sum);
  } else if (i < n_w + n_b) {
    gb[i - n_w] = from_acc<T>(sum);
  } else {
    gm[i - n_w - n_b] = from_acc<T>(sum);
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
cudaError_t forward(const ConvShape& s, const void* x, const void* w, const void* mask, const void* bias, void* out,
                    void* pre, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 grid(ceil_div(s.N * s.HO * s.WO, kBM), ceil_div(s.COUT_G, kBN));
  return launch_z_chunks(grid, s.T * s.G, [&](dim3 chunk, int64_t z0) {
    conv_forward_kernel<T, A><<<chunk, kThreads, 0, stream>>>(
        s, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(mask),
        static_cast<const T*>(bias), static_cast<T*>(out), static_cast<T*>(pre), z0);
  });
}

template <typename T>
cudaError_t input_grad(const ConvShape& s, const void* go, const void* gp, const void* w, const void* mask, void* gx,
                       cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 grid(ceil_div(s.N * s.H * s.W, kBM), ceil_div(s.CIN_G, kBN));
  return launch_z_chunks(grid, s.T * s.G, [&](dim3 chunk, int64_t z0) {
    conv_input_grad_kernel<T, A><<<chunk, kThreads, 0, stream>>>(
        s, static_cast<const T*>(go), static_cast<const T*>(gp), static_cast<const T*>(w),
        static_cast<const T*>(mask), static_cast<T*>(gx), z0);
  });
}

template <typename T, typename O>
cudaError_t weight_grad_pass(const ConvShape& s, const void* go, const void* gp, const void* pre, const void* x,
                             const void* mask, int64_t splits, int64_t per_split, O* gw, O* gb, O* gm,
                             int64_t split_stride, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t K = s.CIN_G * s.KH * s.KW;
  const dim3 grid(ceil_div(s.COUT_G, kBM), gw != nullptr ? ceil_div(K, kBN) : 1);
  return launch_z_chunks(grid, s.T * s.G * splits, [&](dim3 chunk, int64_t z0) {
    conv_weight_grad_kernel<T, A, O><<<chunk, kThreads, 0, stream>>>(
        s, static_cast<const T*>(go), static_cast<const T*>(gp), static_cast<const T*>(pre), static_cast<const T*>(x),
        static_cast<const T*>(mask), splits, per_split, gw, gb, gm, split_stride, z0);
  });
}

template <typename T>
cudaError_t weight_grad(const ConvShape& s, const void* go, const void* gp, const void* pre, const void* x,
                        const void* mask, int64_t splits, int64_t per_split, void* part, void* gw, void* gb, void* gm,
                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (splits == 1) {
    return weight_grad_pass<T, T>(s, go, gp, pre, x, mask, 1, per_split, static_cast<T*>(gw), static_cast<T*>(gb),
                                  static_cast<T*>(gm), 0, stream);
  }
  const int64_t n_w = gw != nullptr ? s.T * s.COUT * s.CIN_G * s.KH * s.KW : 0, n_b = s.T * s.COUT;
  const int64_t stride = n_w + 2 * n_b;
  A* const p = static_cast<A*>(part);
  cudaError_t err = weight_grad_pass<T, A>(s, go, gp, pre, x, mask, splits, per_split, gw != nullptr ? p : nullptr,
                                           p + n_w, p + n_w + n_b, stride, stream);
  if (err != cudaSuccess) return err;
  sum_splits_kernel<T, A><<<ceil_div(stride, kThreads), kThreads, 0, stream>>>(
      p, splits, stride, n_w, n_b, static_cast<T*>(gw), static_cast<T*>(gb), static_cast<T*>(gm));
  return cudaGetLastError();
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
                                const void* mask, const void* bias, void* out, void* pre, cudaStream_t stream) {
  NF_DISPATCH(dtype, forward, s, x, weight, mask, bias, out, pre, stream)
}

cudaError_t masked_conv_input_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                   const void* weight, const void* mask, void* grad_input, cudaStream_t stream) {
  NF_DISPATCH(dtype, input_grad, s, grad_out, grad_pre, weight, mask, grad_input, stream)
}

cudaError_t masked_conv_weight_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                    const void* pre, const void* x, const void* mask, int64_t splits,
                                    int64_t pixels_per_split, void* part, void* grad_weight, void* grad_bias,
                                    void* grad_mask, cudaStream_t stream) {
  NF_DISPATCH(dtype, weight_grad, s, grad_out, grad_pre, pre, x, mask, splits, pixels_per_split, part, grad_weight,
              grad_bias, grad_mask, stream)
}

#undef NF_DISPATCH

}  // namespace neuronml_fast::cuda
