// Kernels that check the CUDA emulation itself (tests/test_cuda_emulation.py): the warp intrinsics'
// results, the races and misuse it must expose, and the launch limits it must enforce. Written as
// CUDA, translated and built like csrc/cuda/*.cu, bound only in the emulated extension.
#include <cooperative_groups.h>

#include "emu/selftest.h"

namespace nf_emu::selftest {

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

// 56 KiB of static shared memory: over the 48 KiB a block may declare statically.
__global__ void big_static_shared_kernel(double* out) {
  __shared__ double big[7168];
  big[threadIdx.x] = 1.0;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x];
}

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
  big_static_shared_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
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

}  // namespace nf_emu::selftest
