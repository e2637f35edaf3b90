// Checks of the CUDA emulation itself (csrc/emu/selftest.cu); each returns the launch status.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace nf_emu::selftest {

cudaError_t warp_ops(int* out);                               // out [32 * 8]
cudaError_t barrier_race(bool barrier, int threads, int* out);  // out [threads]
cudaError_t lane_race(bool syncwarp, int* out);               // out [32]
cudaError_t exited_lanes(int* out);                           // fails: lanes exited before a shuffle
cudaError_t shuffle_against_barrier(int* out);                // fails: can never complete
cudaError_t dynamic_shared(int64_t bytes, bool opt_in, float* out);
cudaError_t big_static_shared(double* out);                   // fails: over 48 KiB of static shared memory
cudaError_t unwritten_shared(float* out);                     // out [64]
cudaError_t grid(unsigned y, int* out);                       // out [y]
cudaError_t too_many_threads(int* out);                       // fails: 1025 threads
cudaError_t atomic_sums(int blocks, float* f, double* d);

// bf16 conversions: out[i], out[n + i], out[2n + i] = in[i] through __float2bfloat16_rn,
// __float2bfloat16_rz and the high half of __floats2bfloat162_rn, back to float.
cudaError_t bf16_conversions(const float* in, int n, float* out);

// WMMA (csrc/emu/wmma.h). The multiplicands of each fragment family, with its shape m x n x k:
// __half / __nv_bfloat16 m16n16k16 (float accumulators), tf32 m16n16k8 (float storage and
// accumulators), double m8n8k4.
enum class WmmaInput { kHalf, kBfloat16, kTf32, kDouble };
struct WmmaGemm {
  bool a_col_major, b_col_major, c_col_major, d_col_major;
  bool has_c;    // else the accumulator starts from fill_fragment(0)
  bool convert;  // tf32: convert the loaded multiplicands with __float_to_tf32, as the CUDA guide does
  double alpha;
};
// D = alpha * (A B + C) with A [2m, 2k], B [2k, n], C and D [2m, n], in the layouts given (leading
// dimensions: the matrices' own); one block of two warps, each warp the m rows of one tile, two
// k-steps, A staged through 32-byte aligned shared memory. a, b: the multiplicands' storage type;
// c, d: the accumulator's.
cudaError_t wmma_gemm(WmmaInput input, const void* a, const void* b, const void* c, void* d, const WmmaGemm& g);
// out [256]: an m16n16k16 float accumulator whose lane l, element i holds l * num_elements + i,
// stored row-major (which element lands where is the fragment mapping).
cudaError_t wmma_mapping(float* out);
// Fails: 0 lanes 16-31 exit before mma_sync; 1 the two half-warps call mma_sync at two different
// calls; 2 a block of 16 threads; 3 a store to a pointer that is not 32-byte aligned; 4 a leading
// dimension that is not a multiple of 16 bytes; 5 lanes that store to different pointers.
// out [1024].
cudaError_t wmma_misuse(int variant, float* out);

// A cooperative launch of `blocks` blocks that meet at a grid barrier (kBarrier), skip it (kNone:
// a race), reach it outside a cooperative launch, after a block exited, or against a block barrier.
enum class GridMode { kBarrier, kNone, kNotCooperative, kExit, kSplit };
cudaError_t grid_barrier(GridMode mode, int blocks, int* out);  // out [2 * blocks]

}  // namespace nf_emu::selftest
