#include "cuda/common.cuh"
#include "cuda/masked.h"

#include <mma.h>

#include <type_traits>

namespace neuronml_fast::cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = kMaskedBM, kBN = kMaskedBN, kBK = kMaskedBK, kThreads = kMaskedThreads, kTM = kMaskedTM,
              kTN = kMaskedTN;
constexpr int kWarps = kThreads / 32;
// Blocks per SM the GEMM kernels are compiled for: two blocks of 8 warps leave 128 registers a
// thread, which no kernel here needs in full (ptxas's own choice of 64 spills the TF32 ones).
constexpr int kMinBlocks = 2;

// ---- 32-bit index math ---------------------------------------------------------------------------

// Division by a divisor fixed for the launch, as a multiply-high and a shift (Granlund and
// Montgomery's round-up method): with l = ceil(log2 d) and m = ceil(2^(31 + l) / d),
// n / d = (n * m) >> (31 + l) exactly for 0 <= n < 2^31. No division instruction, and no call of
// the 64-bit division subroutines a `/` on int64_t compiles to.
struct Divisor {
  uint32_t d = 1, multiplier = 0, shift = 0;

  Divisor() = default;
  explicit Divisor(int64_t divisor) : d(static_cast<uint32_t>(divisor)) {
    if (d == 1) return;
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d);
    shift = l - 1;
  }

  __device__ __forceinline__ int div(int n) const {
    const auto high = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * multiplier) >> 32);
    return d == 1 ? n : static_cast<int>(high >> shift);
  }
  // q = n / d, r = n % d, for 0 <= n < 2^31.
  __device__ __forceinline__ void divmod(int n, int& q, int& r) const {
    q = div(n);
    r = n - q * static_cast<int>(d);
  }
};

// The sizes of one task in 32 bits and the divisors the kernels' index math uses. A task's base
// pointers are 64-bit (task x elements per task); every offset within a task fits an int
// (`masked_conv_index_overflow`).
struct ConvIndex {
  int N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G, KH, KW;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int taps, K, HW, HOWO;  // KH * KW, CIN_G * taps, H * W, HO * WO
  int64_t x_task, out_task, w_task;  // elements per task of the input, the output and the weight
  Divisor by_taps, by_KW, by_W, by_WO, by_HW, by_HOWO, by_stride_h, by_stride_w;
  bool skip_zero;
};

ConvIndex index_of(const ConvShape& s) {
  ConvIndex c{};
  c.N = static_cast<int>(s.N), c.H = static_cast<int>(s.H), c.W = static_cast<int>(s.W);
  c.HO = static_cast<int>(s.HO), c.WO = static_cast<int>(s.WO), c.CIN = static_cast<int>(s.CIN);
  c.COUT = static_cast<int>(s.COUT), c.CIN_G = static_cast<int>(s.CIN_G), c.COUT_G = static_cast<int>(s.COUT_G);
  c.G = static_cast<int>(s.G), c.KH = static_cast<int>(s.KH), c.KW = static_cast<int>(s.KW);
  c.stride_h = static_cast<int>(s.stride_h), c.stride_w = static_cast<int>(s.stride_w);
  c.pad_h = static_cast<int>(s.pad_h), c.pad_w = static_cast<int>(s.pad_w);
  c.dil_h = static_cast<int>(s.dil_h), c.dil_w = static_cast<int>(s.dil_w);
  c.taps = c.KH * c.KW, c.K = c.CIN_G * c.taps, c.HW = c.H * c.W, c.HOWO = c.HO * c.WO;
  c.x_task = s.N * s.CIN * s.H * s.W, c.out_task = s.N * s.COUT * s.HO * s.WO, c.w_task = s.COUT * s.CIN_G * s.KH * s.KW;
  c.by_taps = Divisor(c.taps), c.by_KW = Divisor(c.KW), c.by_W = Divisor(c.W), c.by_WO = Divisor(c.WO);
  c.by_HW = Divisor(c.HW), c.by_HOWO = Divisor(c.HOWO);
  c.by_stride_h = Divisor(c.stride_h), c.by_stride_w = Divisor(c.stride_w);
  c.skip_zero = s.skip_zero;
  return c;
}

// ---- the GEMM engines ------------------------------------------------------------------------------
//
// A block computes a kBM x kBN tile C = sum over K steps of A (kBM x kBK) * B (kBK x kBN), each
// step's A and B staged in shared memory (S, the staging type) by the kernel in the layout its
// global loads coalesce in: A column-major (stored [k][m]) or row-major ([m][k]), B column-major
// ([n][k]) or row-major ([k][n]). An engine multiplies a staged step into its accumulators and
// finally stores them to a row-major C tile in shared memory, which the kernel's epilogue reads.

// Element (row, col) of a staged tile with leading dimension ld.
template <bool kColMajor> __device__ __forceinline__ int at(int row, int col, int ld) {
  return kColMajor ? col * ld + row : row * ld + col;
}

// Shared-memory tiles of staging type S and accumulation type A. Rows are padded by 16 bytes (a
// WMMA leading dimension must be a multiple of 16 bytes; the padding also staggers the banks),
// every tile and fragment starts 32-byte aligned (WMMA's pointer alignment): the padded leading
// dimensions times the fragments' row steps are multiples of 32 bytes. C overlays A and B: it is
// written after the last step's reads.
template <typename S, typename A, bool kAColMajor, bool kBColMajor> struct Tiles {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(S)), kPadC = 16 / static_cast<int>(sizeof(A));
  static constexpr int kLda = kAColMajor ? kBM + kPad : kBK + kPad;
  static constexpr int kLdb = kBColMajor ? kBK + kPad : kBN + kPad;
  static constexpr int kLdc = kBN + kPadC;
  static constexpr int kABytes = (kAColMajor ? kBK : kBM) * kLda * static_cast<int>(sizeof(S));
  static constexpr int kBOffset = (kABytes + 31) / 32 * 32;
  static constexpr int kBBytes = (kBColMajor ? kBN : kBK) * kLdb * static_cast<int>(sizeof(S));
  static constexpr int kCBytes = kBM * kLdc * static_cast<int>(sizeof(A));
  static constexpr int kBytes = kBOffset + kBBytes > kCBytes ? kBOffset + kBBytes : kCBytes;

  static __device__ __forceinline__ S* a(unsigned char* smem) { return reinterpret_cast<S*>(smem); }
  static __device__ __forceinline__ S* b(unsigned char* smem) { return reinterpret_cast<S*>(smem + kBOffset); }
  static __device__ __forceinline__ A* c(unsigned char* smem) { return reinterpret_cast<A*>(smem); }
};

// CUDA-core FMA on a kTM x kTN register micro-tile per thread: exact float32 (and the fallback of
// every dtype on an architecture without the WMMA shapes used here).
template <typename S, typename A> struct FfmaEngine {
  A acc[kTM][kTN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = A(0);
  }

  template <bool kACol, bool kBCol>
  __device__ __forceinline__ void step(const S* As, int lda, const S* Bs, int ldb) {
    const int ty = threadIdx.x / (kBN / kTN), tx = threadIdx.x % (kBN / kTN);
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      A a[kTM], b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = to_acc<A>(As[at<kACol>(ty * kTM + i, k, lda)]);
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = to_acc<A>(Bs[at<kBCol>(k, tx * kTN + j, ldb)]);
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
    }
  }

  __device__ __forceinline__ void store(A* C, int ldc) const {
    const int ty = threadIdx.x / (kBN / kTN), tx = threadIdx.x % (kBN / kTN);
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) C[(ty * kTM + i) * ldc + tx * kTN + j] = acc[i][j];
  }
};

// Warp-level tensor-core MMA through WMMA: the block's 8 warps tile it 4 x 2, each warp owning
// 16 x 32 outputs as FM x FN fragments and stepping K by FK. Element is the fragments' element
// type (__half, __nv_bfloat16, precision::tf32 or double), S the staging type it loads from.
constexpr int kWarpsM = 4, kWarpsN = kWarps / kWarpsM, kWarpRows = kBM / kWarpsM, kWarpCols = kBN / kWarpsN;
static_assert(kWarpsM * kWarpRows == kBM && kWarpsN * kWarpCols == kBN, "the warps tile the block");

template <typename Element, typename S, typename A, int FM, int FN, int FK> struct WmmaEngine {
  static constexpr int kFragsM = kWarpRows / FM, kFragsN = kWarpCols / FN;
  static_assert(kBK % FK == 0, "a K step is whole fragments");
  wmma::fragment<wmma::accumulator, FM, FN, FK, A> acc[kFragsM][kFragsN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], A(0));
  }

  static __device__ __forceinline__ int row0() { return (threadIdx.x / 32) % kWarpsM * kWarpRows; }
  static __device__ __forceinline__ int col0() { return (threadIdx.x / 32) / kWarpsM * kWarpCols; }

  template <bool kACol, bool kBCol>
  __device__ __forceinline__ void step(const S* As, int lda, const S* Bs, int ldb) {
    using LayoutA = std::conditional_t<kACol, wmma::col_major, wmma::row_major>;
    using LayoutB = std::conditional_t<kBCol, wmma::col_major, wmma::row_major>;
    const int r0 = row0(), c0 = col0();
#pragma unroll
    for (int k = 0; k < kBK; k += FK) {
      wmma::fragment<wmma::matrix_a, FM, FN, FK, Element, LayoutA> a[kFragsM];
      wmma::fragment<wmma::matrix_b, FM, FN, FK, Element, LayoutB> b[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) wmma::load_matrix_sync(a[i], As + at<kACol>(r0 + i * FM, k, lda), lda);
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::load_matrix_sync(b[j], Bs + at<kBCol>(k, c0 + j * FN, ldb), ldb);
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(A* C, int ldc) const {
    const int r0 = row0(), c0 = col0();
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        wmma::store_matrix_sync(C + (r0 + i * FM) * ldc + c0 + j * FN, acc[i][j], ldc, wmma::mem_row_major);
  }
};

// The WMMA shapes used here (bfloat16, TF32 and double fragments) need sm_80; an older target
// compiles every kernel on FFMA.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <typename Element, typename S, typename A, int FM, int FN, int FK>
using TensorCoreEngine = FfmaEngine<S, A>;
using Tf32Element = float;
#else
template <typename Element, typename S, typename A, int FM, int FN, int FK>
using TensorCoreEngine = WmmaEngine<Element, S, A, FM, FN, FK>;
using Tf32Element = wmma::precision::tf32;
#endif

// How a kernel multiplies (its second template argument, which names the kernel in the SASS):
struct Hmma {};  // float16 / bfloat16 operands, float accumulation: HMMA m16n16k16
struct Tf32 {};  // float32 operands rounded to TF32, float accumulation: HMMA m16n16k8
struct Ffma {};  // exact float32: FFMA
struct Dmma {};  // float64: DMMA m8n8k4

// Per (dtype, math): the staging type S, the accumulation type A, the engine and the conversion
// of an operand value (in A) to what the engine reads.
template <typename T, typename Math> struct Gemm;

template <typename T> struct Gemm<T, Hmma> {
  using S = T;
  using A = float;
  using Engine = TensorCoreEngine<T, T, float, 16, 16, 16>;
  static __device__ __forceinline__ S stage(float v) { return from_acc<T>(v); }
};

template <> struct Gemm<float, Tf32> {
  using S = float;
  using A = float;
  using Engine = TensorCoreEngine<Tf32Element, float, float, 16, 16, 8>;
  static __device__ __forceinline__ float stage(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    return v;
#else
    return wmma::__float_to_tf32(v);  // rounded once here, not per fragment load
#endif
  }
};

template <> struct Gemm<float, Ffma> {
  using S = float;
  using A = float;
  using Engine = FfmaEngine<float, float>;
  static __device__ __forceinline__ float stage(float v) { return v; }
};

template <> struct Gemm<double, Dmma> {
  using S = double;
  using A = double;
  using Engine = TensorCoreEngine<double, double, double, 8, 8, 4>;
  static __device__ __forceinline__ double stage(double v) { return v; }
};

// ---- the active channels of a (task, group), found by each block from the mask row ---------------

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
template <typename T> __device__ __forceinline__ bool kept(const ConvIndex& s, const T* mask_row, int c) {
  using A = typename Acc<T>::type;
  return c >= 0 && c < s.COUT_G && (!s.skip_zero || to_acc<A>(mask_row[c]) != A(0));
}

// The output channels of compacted slots [slot0, slot0 + kSlots) of group g, slot k holding the
// group's k-th active channel: writes channel[0, kSlots) (-1 past the last active channel) and
// returns how many of the slots are active. A block-wide prefix count over the group's mask row,
// kThreads channels at a time, that stops once the slots are filled. Called by every thread; its
// result is visible to all of them on return.
template <int kSlots, typename T>
__device__ int slot_channels(const ConvIndex& s, const T* mask_row, int g, int slot0, int* channel, int* warp_sums) {
  for (int i = threadIdx.x; i < kSlots; i += kThreads) channel[i] = -1;
  int before = 0;  // active channels before the window
  // Runs at least once (COUT_G >= 1), so its barriers order the -1s before the channels.
  for (int c0 = 0; c0 < s.COUT_G && before < slot0 + kSlots; c0 += kThreads) {
    const int c = c0 + threadIdx.x;
    const bool keep = kept(s, mask_row, c);
    int total = 0;
    const int rank = before + block_inclusive_sum(keep ? 1 : 0, warp_sums, total) - 1;
    if (keep && rank >= slot0 && rank < slot0 + kSlots) channel[rank - slot0] = g * s.COUT_G + c;
    before += total;
  }
  __syncthreads();
  return before - slot0 < 0 ? 0 : before - slot0 < kSlots ? before - slot0 : kSlots;
}

template <typename T, typename A>
__device__ __forceinline__ A grad_y(const T* go, const T* gp, int offset, A m) {
  A v = to_acc<A>(go[offset]) * m;
  if (gp != nullptr) v += to_acc<A>(gp[offset]);
  return v;
}

// ---- forward: rows = output pixels (n, ho, wo), cols = slots of (task, group) v ----------------
// A (x patches) is staged column-major, a thread per pixel: consecutive threads read consecutive
// pixels. B (the slots' weight rows) column-major, a thread per k: consecutive threads read a row.
template <typename T, typename Math>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
conv_forward_kernel(ConvIndex s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ mask,
                    const T* __restrict__ bias, T* __restrict__ out, T* __restrict__ pre, int z0) {
  using G = Gemm<T, Math>;
  using A = typename G::A;
  using Tile = Tiles<typename G::S, A, true, true>;
  __shared__ __align__(32) unsigned char smem[Tile::kBytes];
  __shared__ int channel[kBN];
  __shared__ A slot_mask[kBN];
  __shared__ A slot_bias[kBN];
  __shared__ int own_pruned[kBN];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, v = z0 + static_cast<int>(blockIdx.z), t = v / s.G, g = v % s.G;
  const int m0 = static_cast<int>(blockIdx.x) * kBM, n0 = static_cast<int>(blockIdx.y) * kBN;
  const T* x_t = x + t * s.x_task;
  const T* w_t = w + t * s.w_task;
  const T* mask_t = mask + static_cast<int64_t>(t) * s.COUT;
  const T* mask_row = mask_t + g * s.COUT_G;
  T* out_t = out + t * s.out_task;
  T* pre_t = pre + t * s.out_task;
  const int active = slot_channels<kBN>(s, mask_row, g, n0, channel, warp_sums);
  if (tid < kBN) {
    slot_mask[tid] = tid < active ? to_acc<A>(mask_t[channel[tid]]) : A(0);
    slot_bias[tid] = tid < active && bias != nullptr ? to_acc<A>(bias[static_cast<int64_t>(t) * s.COUT + channel[tid]])
                                                     : A(0);
    const int own = n0 + tid;  // channel n0 + tid of the group: its exact zeros if it is pruned
    own_pruned[tid] = own < s.COUT_G && !kept(s, mask_row, own);
  }
  __syncthreads();

  // This thread's output pixel: its row of A and of the epilogue.
  const int mm = tid % kBM, m = m0 + mm;
  const bool row_ok = m < s.N * s.HOWO;
  int n, p, ho, wo;
  s.by_HOWO.divmod(row_ok ? m : 0, n, p);
  s.by_WO.divmod(p, ho, wo);
  const int x_row = (n * s.CIN + g * s.CIN_G) * s.HW;
  const int hi0 = ho * s.stride_h - s.pad_h, wi0 = wo * s.stride_w - s.pad_w;

  typename G::Engine engine;
  engine.zero();
  if (active > 0) {  // blocks of slots past the active count skip the GEMM
    typename G::S* As = Tile::a(smem);
    typename G::S* Bs = Tile::b(smem);
    for (int k0 = 0; k0 < s.K; k0 += kBK) {
#pragma unroll
      for (int kk = tid / kBM; kk < kBK; kk += kThreads / kBM) {
        const int k = k0 + kk;
        int ci, r, kh, kw;
        s.by_taps.divmod(k, ci, r);
        s.by_KW.divmod(r, kh, kw);
        const int hi = hi0 + kh * s.dil_h, wi = wi0 + kw * s.dil_w;
        const bool ok = row_ok && k < s.K && hi >= 0 && hi < s.H && wi >= 0 && wi < s.W;
        As[at<true>(mm, kk, Tile::kLda)] = G::stage(ok ? to_acc<A>(x_t[x_row + ci * s.HW + hi * s.W + wi]) : A(0));
      }
      const int kk = tid % kBK, k = k0 + kk;
#pragma unroll
      for (int nn = tid / kBK; nn < kBN; nn += kThreads / kBK) {
        const bool ok = k < s.K && nn < active;
        Bs[at<true>(kk, nn, Tile::kLdb)] = G::stage(ok ? to_acc<A>(w_t[channel[nn] * s.K + k]) : A(0));
      }
      __syncthreads();
      engine.template step<true, true>(As, Tile::kLda, Bs, Tile::kLdb);
      __syncthreads();
    }
    engine.store(Tile::c(smem), Tile::kLdc);  // over the staged tiles: the loop's last barrier ordered their reads
    __syncthreads();
  }
  if (!row_ok) return;
  const A* C = Tile::c(smem);
  const int pixel = n * s.COUT * s.HOWO + p;
#pragma unroll 4
  for (int nn = tid / kBM; nn < kBN; nn += kThreads / kBM) {
    if (nn < active) {  // the active channel of slot n0 + nn
      const int offset = pixel + channel[nn] * s.HOWO;
      const A value = C[mm * Tile::kLdc + nn] + slot_bias[nn];
      pre_t[offset] = from_acc<T>(value);
      out_t[offset] = from_acc<T>(slot_mask[nn] * value);
    }
    if (own_pruned[nn]) {
      const int offset = pixel + (g * s.COUT_G + n0 + nn) * s.HOWO;
      pre_t[offset] = from_acc<T>(A(0));
      out_t[offset] = from_acc<T>(A(0));
    }
  }
}

// ---- grad input: rows = input pixels (n, h, w), cols = input channels of group g --------------
// K runs over (active channel, tap), a window of kThreads channels of the group at a time: each
// window's active channels are compacted into shared memory first. A (gy at the output pixel each
// tap reaches) is staged column-major, a thread per pixel; B (weights) row-major, a thread per
// input channel.
template <typename T, typename Math>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
conv_input_grad_kernel(ConvIndex s, const T* __restrict__ go, const T* __restrict__ gp, const T* __restrict__ w,
                       const T* __restrict__ mask, T* __restrict__ gx, int z0) {
  using G = Gemm<T, Math>;
  using A = typename G::A;
  using Tile = Tiles<typename G::S, A, true, false>;
  __shared__ __align__(32) unsigned char smem[Tile::kBytes];
  __shared__ int window_channel[kThreads];
  __shared__ A window_mask[kThreads];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, v = z0 + static_cast<int>(blockIdx.z), t = v / s.G, g = v % s.G;
  const int m0 = static_cast<int>(blockIdx.x) * kBM, c0 = static_cast<int>(blockIdx.y) * kBN;
  const T* go_t = go + t * s.out_task;
  const T* gp_t = gp != nullptr ? gp + t * s.out_task : nullptr;
  const T* w_t = w + t * s.w_task;
  const T* mask_row = mask + static_cast<int64_t>(t) * s.COUT + g * s.COUT_G;
  T* gx_t = gx + t * s.x_task;

  // This thread's input pixel: its row of A and of the epilogue.
  const int mm = tid % kBM, m = m0 + mm;
  const bool row_ok = m < s.N * s.HW;
  int n, q, h, x;
  s.by_HW.divmod(row_ok ? m : 0, n, q);
  s.by_W.divmod(q, h, x);
  const int go_row = n * s.COUT * s.HOWO;
  typename G::S* As = Tile::a(smem);
  typename G::S* Bs = Tile::b(smem);

  typename G::Engine engine;
  engine.zero();
  for (int w0 = 0; w0 < s.COUT_G; w0 += kThreads) {
    const int c = w0 + tid;
    const bool keep = kept(s, mask_row, c);
    int active = 0;
    const int rank = block_inclusive_sum(keep ? 1 : 0, warp_sums, active) - 1;
    if (keep) {
      window_channel[rank] = g * s.COUT_G + c;
      window_mask[rank] = to_acc<A>(mask_row[c]);
    }
    __syncthreads();
    const int K = active * s.taps;  // active channels x taps
    // Every read of the window's lists happens before this loop's last barrier, so the next
    // window's writes (after its own barriers) cannot race with them.
    for (int k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
      for (int kk = tid / kBM; kk < kBK; kk += kThreads / kBM) {
        const int k = k0 + kk;
        int j, r, kh, kw;
        s.by_taps.divmod(k, j, r);
        s.by_KW.divmod(r, kh, kw);
        const int hn = h + s.pad_h - kh * s.dil_h, wn = x + s.pad_w - kw * s.dil_w;
        int ho, rh, wo, rw;
        s.by_stride_h.divmod(hn < 0 ? 0 : hn, ho, rh);
        s.by_stride_w.divmod(wn < 0 ? 0 : wn, wo, rw);
        const bool ok = row_ok && k < K && hn >= 0 && wn >= 0 && rh == 0 && rw == 0 && ho < s.HO && wo < s.WO;
        const A value = ok ? grad_y<T, A>(go_t, gp_t, go_row + window_channel[j] * s.HOWO + ho * s.WO + wo,
                                          window_mask[j])
                           : A(0);
        As[at<true>(mm, kk, Tile::kLda)] = G::stage(value);
      }
      const int nn = tid % kBN, ci = c0 + nn;
#pragma unroll
      for (int kk = tid / kBN; kk < kBK; kk += kThreads / kBN) {
        const int k = k0 + kk;
        int j, r;
        s.by_taps.divmod(k, j, r);
        const bool ok = k < K && ci < s.CIN_G;
        const A value = ok ? to_acc<A>(w_t[(window_channel[j] * s.CIN_G + ci) * s.taps + r]) : A(0);
        Bs[at<false>(kk, nn, Tile::kLdb)] = G::stage(value);
      }
      __syncthreads();
      engine.template step<true, false>(As, Tile::kLda, Bs, Tile::kLdb);
      __syncthreads();
    }
  }
  engine.store(Tile::c(smem), Tile::kLdc);  // the last K step's barrier ordered the staged tiles' reads
  __syncthreads();
  if (!row_ok) return;
  const A* C = Tile::c(smem);
#pragma unroll 4
  for (int nn = tid / kBM; nn < kBN; nn += kThreads / kBM) {
    const int ci = c0 + nn;
    if (ci < s.CIN_G) gx_t[(n * s.CIN + g * s.CIN_G + ci) * s.HW + q] = from_acc<T>(C[mm * Tile::kLdc + nn]);
  }
}

// ---- grad weight (+ bias and mask): rows = slots, cols = (ci, kh, kw), reduced over pixels ----
// Split `split` writes at offset split * split_stride of gw, gb and gm, in O: the gradients'
// dtype T when there is one split, partial sums in A for `sum_splits_kernel` otherwise. Both
// operands are staged with a thread per pixel (consecutive threads, consecutive pixels): A (gy of
// the slots) row-major, B (x patches of the columns) column-major. The bias and mask gradients are
// summed from the same gy loads, by the first block of columns.
template <typename T, typename Math, typename O>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
conv_weight_grad_kernel(ConvIndex s, const T* __restrict__ go, const T* __restrict__ gp, const T* __restrict__ pre,
                        const T* __restrict__ x, const T* __restrict__ mask, int splits, int per_split,
                        O* __restrict__ gw, O* __restrict__ gb, O* __restrict__ gm, int64_t split_stride, int z0) {
  using G = Gemm<T, Math>;
  using A = typename G::A;
  using Tile = Tiles<typename G::S, A, false, true>;
  constexpr int kRowsPerThread = kBM * kBK / kThreads, kColsPerThread = kBN * kBK / kThreads;
  __shared__ __align__(32) unsigned char smem[Tile::kBytes];
  __shared__ int channel[kBM];
  __shared__ A slot_mask[kBM];
  __shared__ int own_pruned[kBM];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, z = z0 + static_cast<int>(blockIdx.z), v = z / splits, split = z % splits;
  const int t = v / s.G, g = v % s.G;
  const int j0 = static_cast<int>(blockIdx.x) * kBM, c0 = static_cast<int>(blockIdx.y) * kBN;
  const int pixels = s.N * s.HOWO, start = split * per_split;
  const int stop = per_split < pixels - start ? start + per_split : pixels;
  const T* go_t = go + t * s.out_task;
  const T* gp_t = gp != nullptr ? gp + t * s.out_task : nullptr;
  const T* pre_t = pre != nullptr ? pre + t * s.out_task : nullptr;
  const T* x_t = x + t * s.x_task;
  const T* mask_t = mask + static_cast<int64_t>(t) * s.COUT;
  const T* mask_row = mask_t + g * s.COUT_G;
  const int active = slot_channels<kBM>(s, mask_row, g, j0, channel, warp_sums);
  if (tid < kBM) {
    slot_mask[tid] = tid < active ? to_acc<A>(mask_t[channel[tid]]) : A(0);
    const int own = j0 + tid;  // channel j0 + tid of the group: its zeros if it is pruned
    own_pruned[tid] = own < s.COUT_G && !kept(s, mask_row, own);
  }
  __syncthreads();
  const bool need_gw = gw != nullptr, reduce_here = blockIdx.y == 0;

  // This thread stages pixel kk of every K step, for slots and columns tid / kBK + i * 16.
  const int kk = tid % kBK, first = tid / kBK;
  int col_offset[kColsPerThread], col_dh[kColsPerThread], col_dw[kColsPerThread];
  bool col_ok[kColsPerThread];
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) {
    const int col = c0 + first + i * (kThreads / kBK);
    col_ok[i] = col < s.K;
    int ci, r, kh, kw;
    s.by_taps.divmod(col_ok[i] ? col : 0, ci, r);
    s.by_KW.divmod(r, kh, kw);
    col_offset[i] = (g * s.CIN_G + ci) * s.HW, col_dh[i] = kh * s.dil_h, col_dw[i] = kw * s.dil_w;
  }
  A sum_gy[kRowsPerThread] = {}, sum_mask[kRowsPerThread] = {};

  typename G::Engine engine;
  engine.zero();
  if (active > 0 && (need_gw || reduce_here)) {
    typename G::S* As = Tile::a(smem);
    typename G::S* Bs = Tile::b(smem);
    for (int p0 = start; p0 < stop; p0 += kBK) {
      const int pixel = p0 + kk;
      const bool pixel_ok = pixel < stop;
      int n, p, ho, wo;
      s.by_HOWO.divmod(pixel_ok ? pixel : 0, n, p);
      s.by_WO.divmod(p, ho, wo);
      const int go_pixel = n * s.COUT * s.HOWO + p;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int slot = first + i * (kThreads / kBK);
        const bool ok = pixel_ok && slot < active;
        const int offset = go_pixel + (ok ? channel[slot] : 0) * s.HOWO;
        const A gy = ok ? grad_y<T, A>(go_t, gp_t, offset, slot_mask[slot]) : A(0);
        if (reduce_here) {
          sum_gy[i] += gy;
          if (ok && pre_t != nullptr) sum_mask[i] += to_acc<A>(go_t[offset]) * to_acc<A>(pre_t[offset]);
        }
        if (need_gw) As[at<false>(slot, kk, Tile::kLda)] = G::stage(gy);
      }
      if (!need_gw) continue;
      const int x_pixel = n * s.CIN * s.HW, hi0 = ho * s.stride_h - s.pad_h, wi0 = wo * s.stride_w - s.pad_w;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const int hi = hi0 + col_dh[i], wi = wi0 + col_dw[i];
        const bool ok = pixel_ok && col_ok[i] && hi >= 0 && hi < s.H && wi >= 0 && wi < s.W;
        const A value = ok ? to_acc<A>(x_t[x_pixel + col_offset[i] + hi * s.W + wi]) : A(0);
        Bs[at<true>(kk, first + i * (kThreads / kBK), Tile::kLdb)] = G::stage(value);
      }
      __syncthreads();
      engine.template step<false, true>(As, Tile::kLda, Bs, Tile::kLdb);
      __syncthreads();
    }
  }

  // Bias and mask gradients: the 16 threads of a slot (a half-warp, consecutive kk) add their
  // sums in a fixed tree, so the result is the same on every run.
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int offset = kBK / 2; offset > 0; offset >>= 1) {
      sum_gy[i] += __shfl_xor_sync(0xffffffffu, sum_gy[i], offset);
      sum_mask[i] += __shfl_xor_sync(0xffffffffu, sum_mask[i], offset);
    }
  }
  O* const gb_split = gb + split * split_stride + static_cast<int64_t>(t) * s.COUT;
  O* const gm_split = gm + split * split_stride + static_cast<int64_t>(t) * s.COUT;
  if (reduce_here && kk == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int slot = first + i * (kThreads / kBK);
      if (slot < active) {
        gb_split[channel[slot]] = from_acc<O>(sum_gy[i]);
        gm_split[channel[slot]] = from_acc<O>(sum_mask[i]);
      }
      if (own_pruned[slot]) {
        gb_split[g * s.COUT_G + j0 + slot] = from_acc<O>(A(0));
        gm_split[g * s.COUT_G + j0 + slot] = from_acc<O>(A(0));
      }
    }
  }
  if (!need_gw) return;
  engine.store(Tile::c(smem), Tile::kLdc);  // the last K step's barrier ordered the staged tiles' reads
  __syncthreads();
  O* const gw_t = gw + split * split_stride + t * s.w_task;
  const A* C = Tile::c(smem);
  const int nn = tid % kBN, col = c0 + nn;
  if (col >= s.K) return;
#pragma unroll 4
  for (int slot = tid / kBN; slot < kBM; slot += kThreads / kBN) {
    if (slot < active) gw_t[channel[slot] * s.K + col] = from_acc<O>(C[slot * Tile::kLdc + nn]);
    if (own_pruned[slot]) gw_t[(g * s.COUT_G + j0 + slot) * s.K + col] = from_acc<O>(A(0));
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
    launch(grid, static_cast<int>(z0));
    err = cudaGetLastError();
  }
  return err;
}

template <typename T, typename Math>
cudaError_t forward(const ConvShape& s, const void* x, const void* w, const void* mask, const void* bias, void* out,
                    void* pre, cudaStream_t stream) {
  if (masked_conv_index_overflow(s) != nullptr) return cudaErrorInvalidValue;
  const ConvIndex index = index_of(s);
  const dim3 grid(ceil_div(s.N * s.HO * s.WO, kBM), ceil_div(s.COUT_G, kBN));
  return launch_z_chunks(grid, s.T * s.G, [&](dim3 chunk, int z0) {
    conv_forward_kernel<T, Math><<<chunk, kThreads, 0, stream>>>(
        index, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(mask),
        static_cast<const T*>(bias), static_cast<T*>(out), static_cast<T*>(pre), z0);
  });
}

template <typename T, typename Math>
cudaError_t input_grad(const ConvShape& s, const void* go, const void* gp, const void* w, const void* mask, void* gx,
                       cudaStream_t stream) {
  if (masked_conv_index_overflow(s) != nullptr) return cudaErrorInvalidValue;
  const ConvIndex index = index_of(s);
  const dim3 grid(ceil_div(s.N * s.H * s.W, kBM), ceil_div(s.CIN_G, kBN));
  return launch_z_chunks(grid, s.T * s.G, [&](dim3 chunk, int z0) {
    conv_input_grad_kernel<T, Math><<<chunk, kThreads, 0, stream>>>(
        index, static_cast<const T*>(go), static_cast<const T*>(gp), static_cast<const T*>(w),
        static_cast<const T*>(mask), static_cast<T*>(gx), z0);
  });
}

template <typename T, typename Math, typename O>
cudaError_t weight_grad_pass(const ConvShape& s, const void* go, const void* gp, const void* pre, const void* x,
                             const void* mask, int64_t splits, int64_t per_split, O* gw, O* gb, O* gm,
                             int64_t split_stride, cudaStream_t stream) {
  const ConvIndex index = index_of(s);
  const int64_t K = s.CIN_G * s.KH * s.KW;
  const dim3 grid(ceil_div(s.COUT_G, kBM), gw != nullptr ? ceil_div(K, kBN) : 1);
  return launch_z_chunks(grid, s.T * s.G * splits, [&](dim3 chunk, int z0) {
    conv_weight_grad_kernel<T, Math, O><<<chunk, kThreads, 0, stream>>>(
        index, static_cast<const T*>(go), static_cast<const T*>(gp), static_cast<const T*>(pre),
        static_cast<const T*>(x), static_cast<const T*>(mask), static_cast<int>(splits), static_cast<int>(per_split),
        gw, gb, gm, split_stride, z0);
  });
}

template <typename T, typename Math>
cudaError_t weight_grad(const ConvShape& s, const void* go, const void* gp, const void* pre, const void* x,
                        const void* mask, int64_t splits, int64_t per_split, void* part, void* gw, void* gb, void* gm,
                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (masked_conv_index_overflow(s) != nullptr || s.T * s.G * splits > kMaskedMaxIndex ||
      splits * per_split > kMaskedMaxIndex) {
    return cudaErrorInvalidValue;
  }
  if (splits == 1) {
    return weight_grad_pass<T, Math, T>(s, go, gp, pre, x, mask, 1, per_split, static_cast<T*>(gw),
                                        static_cast<T*>(gb), static_cast<T*>(gm), 0, stream);
  }
  const int64_t n_w = gw != nullptr ? s.T * s.COUT * s.CIN_G * s.KH * s.KW : 0, n_b = s.T * s.COUT;
  const int64_t stride = n_w + 2 * n_b;
  A* const p = static_cast<A*>(part);
  cudaError_t err = weight_grad_pass<T, Math, A>(s, go, gp, pre, x, mask, splits, per_split,
                                                 gw != nullptr ? p : nullptr, p + n_w, p + n_w + n_b, stride, stream);
  if (err != cudaSuccess) return err;
  sum_splits_kernel<T, A><<<ceil_div(stride, kThreads), kThreads, 0, stream>>>(
      p, splits, stride, n_w, n_b, static_cast<T*>(gw), static_cast<T*>(gb), static_cast<T*>(gm));
  return cudaGetLastError();
}

}  // namespace

const char* masked_conv_index_overflow(const ConvShape& s) {
  if (s.N * s.CIN * s.H * s.W > kMaskedMaxIndex) return "input";
  if (s.N * s.COUT * s.HO * s.WO > kMaskedMaxIndex) return "output";
  if (s.COUT * s.CIN_G * s.KH * s.KW > kMaskedMaxIndex) return "weight";
  if (s.T * s.G > kMaskedMaxIndex || s.T * s.COUT > kMaskedMaxIndex) return "tasks x groups";
  return nullptr;
}

// The kernels of each dtype: float32 on TF32 tensor cores or exact FFMA, the others on their one
// tensor-core path.
#define NF_DISPATCH(dtype, fp32, FN, ...)                                                   \
  switch (dtype) {                                                                          \
    case DType::kFloat32:                                                                   \
      return (fp32) == Fp32Gemm::kTf32 ? FN<float, Tf32>(__VA_ARGS__) : FN<float, Ffma>(__VA_ARGS__); \
    case DType::kFloat64: return FN<double, Dmma>(__VA_ARGS__);                            \
    case DType::kFloat16: return FN<__half, Hmma>(__VA_ARGS__);                            \
    case DType::kBFloat16: return FN<__nv_bfloat16, Hmma>(__VA_ARGS__);                    \
  }                                                                                         \
  return cudaErrorInvalidValue;

cudaError_t masked_conv_forward(DType dtype, Fp32Gemm fp32, const ConvShape& s, const void* x, const void* weight,
                                const void* mask, const void* bias, void* out, void* pre, cudaStream_t stream) {
  NF_DISPATCH(dtype, fp32, forward, s, x, weight, mask, bias, out, pre, stream)
}

cudaError_t masked_conv_input_grad(DType dtype, Fp32Gemm fp32, const ConvShape& s, const void* grad_out,
                                   const void* grad_pre, const void* weight, const void* mask, void* grad_input,
                                   cudaStream_t stream) {
  NF_DISPATCH(dtype, fp32, input_grad, s, grad_out, grad_pre, weight, mask, grad_input, stream)
}

cudaError_t masked_conv_weight_grad(DType dtype, Fp32Gemm fp32, const ConvShape& s, const void* grad_out,
                                    const void* grad_pre, const void* pre, const void* x, const void* mask,
                                    int64_t splits, int64_t pixels_per_split, void* part, void* grad_weight,
                                    void* grad_bias, void* grad_mask, cudaStream_t stream) {
  NF_DISPATCH(dtype, fp32, weight_grad, s, grad_out, grad_pre, pre, x, mask, splits, pixels_per_split, part,
              grad_weight, grad_bias, grad_mask, stream)
}

#undef NF_DISPATCH

}  // namespace neuronml_fast::cuda
