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

// A cooperative launch of `blocks` blocks that meet at a grid barrier (kBarrier), skip it (kNone:
// a race), reach it outside a cooperative launch, after a block exited, or against a block barrier.
enum class GridMode { kBarrier, kNone, kNotCooperative, kExit, kSplit };
cudaError_t grid_barrier(GridMode mode, int blocks, int* out);  // out [2 * blocks]

}  // namespace nf_emu::selftest
