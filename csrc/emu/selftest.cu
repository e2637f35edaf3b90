// Kernels that check the CUDA emulation itself (tests/test_cuda_emulation.py): the warp intrinsics'
// and the WMMA operations' results, the races and misuse it must expose (a missing grid barrier of a
// cooperative launch too), and the launch limits it must enforce. Written as CUDA, translated and
// built like csrc/cuda/*.cu, bound only in the emulated extension; the same source compiles with
// nvcc for sm_80 and sm_90.
#include <cooperative_groups.h>

#include "emu/selftest.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace nf_emu::selftest {

namespace wmma = nvcuda::wmma;

namespace {

constexpr unsigned kFull = 0xffffffffu;

// out [32, 8]: each lane's result of each intrinsic.
__global__ void warp_ops_kernel(int* out) {
  const int lane = threadIdx.x;
  const int v = lane * 10;
  int* row = out + lane * 8;
  row[0] = __shfl_sync(kFull, v, 3);
  row[1] = __shfl_up_sync(kFull, v, 2);
  row[2] = __shfl_down_sync(kFull, v, 5);
  row[3] = __shfl_xor_sync(kFull, v, 1);
  row[4] = __shfl_down_sync(kFull, v, 1, 8);
  row[5] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  row[6] = __any_sync(kFull, lane == 7) + 2 * __all_sync(kFull, lane < 31);
  float s = static_cast<float>(lane);
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(kFull, s, offset);
  row[7] = static_cast<int>(s);
}

// Each thread publishes its index, then reads the slot of a thread one warp ahead: correct only
// with the barrier between the two.
__global__ void barrier_kernel(bool barrier, int* out) {
  extern __shared__ int slots[];
  const int n = blockDim.x, tid = threadIdx.x;
  slots[tid] = tid;
  if (barrier) __syncthreads();
  out[tid] = slots[(tid + 32) % n];
}

// The same inside a warp: lane i reads lane i + 1's slot, correct only with __syncwarp.
__global__ void lane_kernel(bool syncwarp, int* out) {
  __shared__ int slots[32];
  const int lane = threadIdx.x;
  slots[lane] = lane;
  if (syncwarp) __syncwarp();
  out[lane] = slots[(lane + 1) % 32];
}

// Lanes 16-31 return before the warp-wide shuffle names them.
__global__ void exited_lanes_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(kFull, static_cast<int>(threadIdx.x), 1);
}

// Half of a warp waits at __syncthreads while the other half shuffles with it.
__global__ void shuffle_against_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_sync(kFull, 1, 0);
  } else {
    __syncthreads();
  }
}

__global__ void dynamic_shared_kernel(float* out, int64_t floats) {
  extern __shared__ float buffer[];
  for (int64_t i = threadIdx.x; i < floats; i += blockDim.x) buffer[i] = static_cast<float>(i);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = buffer[floats - 1];
}

#ifdef __CUDACC_EMULATED__
// 56 KiB of static shared memory: over the 48 KiB a block may declare statically (ptxas refuses
// it at compile time, the emulation at the launch).
__global__ void big_static_shared_kernel(double* out) {
  __shared__ double big[7168];
  big[threadIdx.x] = 1.0;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x];
}
#endif

// Reads shared memory nobody wrote: the emulation fills it with 0xff bytes (NaN).
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float never_written[64];
  out[threadIdx.x] = never_written[threadIdx.x];
}

__global__ void grid_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.z == 0) out[blockIdx.y] = static_cast<int>(blockIdx.y);
}

// Each block publishes its number, then reads the next block's: correct only with the grid
// barrier between the two. The other modes misuse the barrier.
struct GridProbe {
  GridMode mode;
  int* out;    // [blocks]: what each block read
  int* slots;  // [blocks]: what each block published
};

__global__ void grid_barrier_kernel(GridProbe p) {
  const int block = static_cast<int>(blockIdx.x), blocks = static_cast<int>(gridDim.x);
  if (threadIdx.x == 0) p.slots[block] = block + 1;
  if (p.mode == GridMode::kExit && block == 0) return;  // the whole block leaves before the barrier
  if (p.mode == GridMode::kSplit && threadIdx.x >= 32) {
    __syncthreads();  // half the block waits here while the other half waits at the grid barrier
  } else if (p.mode != GridMode::kNone) {
    cooperative_groups::this_grid().sync();
  }
  if (threadIdx.x == 0) p.out[block] = p.slots[(block + 1) % blocks];
}

__global__ void atomic_kernel(float* f, double* d) {
  atomicAdd(f, 1.0f);
  atomicAdd(d, 0.5);
}

__global__ void bf16_conversions_kernel(const float* in, int n, float* out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    out[i] = __bfloat162float(__float2bfloat16_rn(in[i]));
    out[n + i] = __bfloat162float(__float2bfloat16_rz(in[i]));
    out[2 * n + i] = __high2float(__floats2bfloat162_rn(0.0f, in[i]));
  }
}

// ---- WMMA ----------------------------------------------------------------------------------------

// The multiplicands' fragment element type -> shape, storage and accumulator types.
template <typename Element> struct WmmaShape {
  static constexpr int m = 16, n = 16, k = 16;
  using In = Element;
  using Acc = float;
};
template <> struct WmmaShape<wmma::precision::tf32> {
  static constexpr int m = 16, n = 16, k = 8;
  using In = float;
  using Acc = float;
};
template <> struct WmmaShape<double> {
  static constexpr int m = 8, n = 8, k = 4;
  using In = double;
  using Acc = double;
};

template <typename Fragment> __device__ void convert_to_tf32(Fragment& f) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

template <typename Element, typename LayoutA, typename LayoutB>
__global__ void wmma_gemm_kernel(const typename WmmaShape<Element>::In* a, const typename WmmaShape<Element>::In* b,
                                 const typename WmmaShape<Element>::Acc* c, typename WmmaShape<Element>::Acc* d,
                                 WmmaGemm g) {
  using Shape = WmmaShape<Element>;
  using In = typename Shape::In;
  using Acc = typename Shape::Acc;
  constexpr int M = Shape::m, N = Shape::n, K = Shape::k;
  constexpr bool a_col = std::is_same<LayoutA, wmma::col_major>::value;
  constexpr bool b_col = std::is_same<LayoutB, wmma::col_major>::value;
  __shared__ Acc scale;  // declared first: the tile after it must still be 32-byte aligned for WMMA
  __shared__ __align__(32) In staged[2][M * K];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) scale = static_cast<Acc>(g.alpha);
  __syncthreads();
  const unsigned lda = a_col ? 2 * M : 2 * K, ldb = b_col ? 2 * K : N;
  const unsigned ldc = g.c_col_major ? 2 * M : N, ldd = g.d_col_major ? 2 * M : N;
  const int c_tile = g.c_col_major ? warp * M : warp * M * N, d_tile = g.d_col_major ? warp * M : warp * M * N;

  wmma::fragment<wmma::accumulator, M, N, K, Acc> acc;
  if (g.has_c) {
    wmma::load_matrix_sync(acc, c + c_tile, ldc, g.c_col_major ? wmma::mem_col_major : wmma::mem_row_major);
  } else {
    wmma::fill_fragment(acc, Acc(0));
  }
  for (int step = 0; step < 2; ++step) {
    // This warp's M x K tile of A, copied into shared memory in A's layout.
    const In* tile = a + (a_col ? step * K * lda + warp * M : warp * M * lda + step * K);
    __syncwarp();
    for (int i = lane; i < M * K; i += 32) {
      const int row = a_col ? i % M : i / K, col = a_col ? i / M : i % K;
      staged[warp][i] = tile[a_col ? col * lda + row : row * lda + col];
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, M, N, K, Element, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, M, N, K, Element, LayoutB> fb;
    wmma::load_matrix_sync(fa, staged[warp], a_col ? M : K);
    wmma::load_matrix_sync(fb, b + (b_col ? step * K : step * K * N), ldb);
    if constexpr (std::is_same<Element, wmma::precision::tf32>::value) {
      if (g.convert) {
        convert_to_tf32(fa);
        convert_to_tf32(fb);
      }
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = acc.x[i] * scale;
  wmma::store_matrix_sync(d + d_tile, acc, ldd, g.d_col_major ? wmma::mem_col_major : wmma::mem_row_major);
}

template <typename Element>
cudaError_t launch_wmma_gemm(const void* a, const void* b, const void* c, void* d, const WmmaGemm& g) {
  using In = typename WmmaShape<Element>::In;
  using Acc = typename WmmaShape<Element>::Acc;
  const auto* ta = static_cast<const In*>(a);
  const auto* tb = static_cast<const In*>(b);
  const auto* tc = static_cast<const Acc*>(c);
  auto* td = static_cast<Acc*>(d);
  if (g.a_col_major && g.b_col_major) {
    wmma_gemm_kernel<Element, wmma::col_major, wmma::col_major><<<1, 64>>>(ta, tb, tc, td, g);
  } else if (g.a_col_major) {
    wmma_gemm_kernel<Element, wmma::col_major, wmma::row_major><<<1, 64>>>(ta, tb, tc, td, g);
  } else if (g.b_col_major) {
    wmma_gemm_kernel<Element, wmma::row_major, wmma::col_major><<<1, 64>>>(ta, tb, tc, td, g);
  } else {
    wmma_gemm_kernel<Element, wmma::row_major, wmma::row_major><<<1, 64>>>(ta, tb, tc, td, g);
  }
  return cudaGetLastError();
}

__global__ void wmma_mapping_kernel(float* out) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = static_cast<float>(threadIdx.x * acc.num_elements + i);
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

__global__ void wmma_misuse_kernel(int variant, float* out) {
  const int lane = threadIdx.x % 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(fa, __float2half(1.0f));
  wmma::fill_fragment(fb, __float2half(1.0f));
  wmma::fill_fragment(acc, 0.0f);
  float* target = out;
  unsigned ldm = 16;
  if (variant == 0 && lane >= 16) return;
  if (variant == 1 && lane >= 16) {
    wmma::mma_sync(acc, fa, fb, acc);
  } else {
    wmma::mma_sync(acc, fa, fb, acc);
  }
  if (variant == 3) target = out + 4;            // 16-byte aligned, not 32
  if (variant == 4) ldm = 18;                    // 72 bytes
  if (variant == 5) target = out + 256 * (lane / 16);
  wmma::store_matrix_sync(target, acc, ldm, wmma::mem_row_major);
}

}  // namespace

cudaError_t warp_ops(int* out) {
  warp_ops_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

cudaError_t barrier_race(bool barrier, int threads, int* out) {
  barrier_kernel<<<1, threads, threads * sizeof(int)>>>(barrier, out);
  return cudaGetLastError();
}

cudaError_t lane_race(bool syncwarp, int* out) {
  lane_kernel<<<1, 32>>>(syncwarp, out);
  return cudaGetLastError();
}

cudaError_t exited_lanes(int* out) {
  exited_lanes_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

cudaError_t shuffle_against_barrier(int* out) {
  shuffle_against_barrier_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

cudaError_t dynamic_shared(int64_t bytes, bool opt_in, float* out) {
  if (opt_in) {
    const cudaError_t err = cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  dynamic_shared_kernel<<<1, 128, static_cast<size_t>(bytes)>>>(out, bytes / static_cast<int64_t>(sizeof(float)));
  return cudaGetLastError();
}

cudaError_t big_static_shared(double* out) {
#ifdef __CUDACC_EMULATED__
  big_static_shared_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
#else
  return cudaErrorInvalidValue;  // the kernel does not compile for a GPU
#endif
}

cudaError_t unwritten_shared(float* out) {
  unwritten_shared_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}

cudaError_t grid(unsigned y, int* out) {
  grid_kernel<<<dim3(1, y, 1), 32>>>(out);
  return cudaGetLastError();
}

cudaError_t too_many_threads(int* out) {
  grid_kernel<<<1, 1025>>>(out);
  return cudaGetLastError();
}

cudaError_t grid_barrier(GridMode mode, int blocks, int* out) {
  GridProbe probe{mode, out, out + blocks};
  if (mode == GridMode::kNotCooperative) {
    grid_barrier_kernel<<<blocks, 64>>>(probe);
    return cudaGetLastError();
  }
  void* args[] = {&probe};
  return cudaLaunchCooperativeKernel(grid_barrier_kernel, dim3(blocks), dim3(64), args, 0, nullptr);
}

cudaError_t atomic_sums(int blocks, float* f, double* d) {
  atomic_kernel<<<blocks, 256>>>(f, d);
  return cudaGetLastError();
}

cudaError_t bf16_conversions(const float* in, int n, float* out) {
  bf16_conversions_kernel<<<1, 64>>>(in, n, out);
  return cudaGetLastError();
}

cudaError_t wmma_gemm(WmmaInput input, const void* a, const void* b, const void* c, void* d, const WmmaGemm& g) {
  switch (input) {
    case WmmaInput::kHalf: return launch_wmma_gemm<__half>(a, b, c, d, g);
    case WmmaInput::kBfloat16: return launch_wmma_gemm<__nv_bfloat16>(a, b, c, d, g);
    case WmmaInput::kTf32: return launch_wmma_gemm<wmma::precision::tf32>(a, b, c, d, g);
    case WmmaInput::kDouble: return launch_wmma_gemm<double>(a, b, c, d, g);
  }
  return cudaErrorInvalidValue;
}

cudaError_t wmma_mapping(float* out) {
  wmma_mapping_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

cudaError_t wmma_misuse(int variant, float* out) {
  wmma_misuse_kernel<<<1, variant == 2 ? 16 : 32>>>(variant, out);
  return cudaGetLastError();
}

}  // namespace nf_emu::selftest
