// CUDA emulated on the CPU, so that the framework-free kernels in csrc/cuda/*.cu compile unchanged
// as C++ and run on host memory (NEURONML_FAST_CUDA_EMULATE=1; see README.md, "The GPU kernels on
// a machine without a GPU").
//
// Execution model, chosen to expose the bugs a GPU hides until it is busy:
// * each thread of a block is a cooperative fiber; a launch runs its blocks one after another;
// * a warp's lanes advance together only at the warp intrinsics (__shfl*_sync, __ballot_sync,
//   __any_sync, __all_sync, __syncwarp): between two of them a lane runs alone, so a lane that
//   reads what another lane writes without a warp barrier sees the schedule's order;
// * warps advance together only at __syncthreads: between two barriers each warp runs as far as it
//   can before the next warp starts, in forward, reverse or random warp (and lane) order
//   (`config().order`); a missing barrier then gives order-dependent results;
// * a cooperative launch (cudaLaunchCooperativeKernel) keeps every block of its grid resident, as
//   a GPU does: the blocks run by turns between grid barriers (cooperative_groups'
//   this_grid().sync()), in forward, reverse or random block order per turn, so a read of another
//   block's writes without the barrier between them gives order-dependent results; a grid larger
//   than the device holds at once fails as on a GPU, and so does a grid barrier that some thread
//   can never reach (it exited, or waits at __syncthreads);
// * shared memory (static and dynamic) is filled with 0xff bytes (NaN) at every block start;
// * launch limits are checked as a GPU checks them (1024 threads a block, grid y/z <= 65535, the
//   48 KiB dynamic shared memory default and the cudaFuncSetAttribute opt-in), and misuse of the
//   intrinsics (a lane that exited or waits elsewhere while its warp shuffles, a shuffle that reads
//   a lane outside its mask, a barrier that can never complete) fails the launch with a message.
//
// Kernels are translated by csrc/emu/translate.py first: `k<<<grid, block, smem, stream>>>(args)`
// becomes `::nf_emu::Launcher(k, grid, block, smem, stream)(args)`, and `__shared__` declarations
// become references into the block's shared-memory arena.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- keywords -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __CUDACC_EMULATED__ 1

// ---- runtime types --------------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

// ---- the emulator's interface -----------------------------------------------------------------------
namespace nf_emu {

enum class Order { kForward, kReverse, kRandom };

// The emulated device and schedule, read by every launch: `config()` returns them, and changes to
// it (from Python: `configure_emulation` in csrc/cuda/bindings.cpp) apply to later launches.
struct Config {
  Order order = Order::kRandom;
  uint64_t seed = 0;
  int64_t max_grid_x = 2147483647;
  int64_t max_grid_yz = 65535;
  int64_t max_threads_per_block = 1024;
  int64_t default_shared_bytes = 48 * 1024;  // per block without the opt-in
  int64_t optin_shared_bytes = 227 * 1024;   // an H100/H200's opt-in maximum
  int64_t multiprocessors = 132;
  int64_t threads_per_multiprocessor = 2048;
  int64_t shared_bytes_per_multiprocessor = 228 * 1024;
  int64_t stack_bytes = 128 * 1024;          // per emulated thread
  // A launch is checked and counted but no block runs (bench/launches.py counts the launches of
  // problems too large to emulate); outputs are left as they were.
  bool count_only = false;
};

Config& config();

struct Stats {  // counters over every host thread that launches
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, switches{0}, failed_launches{0}, grid_barriers{0};
};
Stats& stats();

// The part of a thread's state that kernel code reads.
struct ThreadView {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

ThreadView& view();  // the running emulated thread's indices

// Warp intrinsics: every lane of `mask` posts `bits` and waits until the whole group has posted.
enum class WarpOp { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSync, kCollective };
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width);

// A warp-collective operation (the WMMA *_sync functions, csrc/emu/wmma.h): each of the warp's 32
// lanes posts `payload` and waits; once all 32 wait at the same call (the same `site`: the same
// instruction, as the PTX ISA requires), `run` runs once with the payloads in lane order, then
// every lane goes on. `run` returns an empty string, or why the operation is invalid: the launch
// then fails with that message, as it does for a lane that exited, waits at a barrier or at
// another call, or is missing from a warp of fewer than 32 threads.
struct CallSite {
  const char* function;  // e.g. "wmma::mma_sync"
  const char* file;
  unsigned line, column;
};
using CollectiveRun = std::string (*)(void* const payloads[32]);
void warp_collective(const CallSite& site, CollectiveRun run, void* payload);

// The order in which a warp-wide fragment of `count` elements lists its matrix elements (lane
// `l`'s slot `i` holds element `order[i * 32 + l]`), per fragment `kind`: the identity in forward
// warp order, reversed in reverse order, a permutation drawn from the seed in random order. The
// mapping is unspecified on a GPU; changing it with the schedule exposes code that relies on one.
const int* fragment_order(uint64_t kind, int count);

void sync_threads();
int sync_threads_count(int predicate);
void grid_sync();  // cooperative_groups::this_grid().sync()
void* static_shared(size_t bytes, size_t align);
void* dynamic_shared();
unsigned active_mask();
[[noreturn]] void fail(cudaError_t code, const char* message);

// Host side.
using Body = std::function<void()>;
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, const Body& body,
                   bool cooperative = false);
// Blocks of `threads` threads and `shared_bytes` of dynamic shared memory one multiprocessor holds
// at once (by threads and shared memory: the emulation cannot count registers).
int max_active_blocks(int threads, size_t shared_bytes);
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
cudaError_t take_last_error();
cudaError_t peek_last_error();
const char* error_string(cudaError_t code);

// A `__shared__ __align__(Align) T name;` declaration (translate.py passes the alignment).
template <typename T, size_t Align = alignof(T)> T& static_shared() {
  return *static_cast<T*>(static_shared(sizeof(T), std::max<size_t>({Align, alignof(T), 16})));
}

template <typename T> T* dynamic_shared() { return static_cast<T*>(dynamic_shared()); }

// `kernel<<<grid, block, smem, stream>>>(args...)` after translation. Arguments are converted to
// the kernel's parameter types at the launch and copied, as a GPU launch copies them.
template <typename... Params>
class Launcher {
 public:
  Launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    auto* kernel = kernel_;
    launch(reinterpret_cast<const void*>(kernel), grid_, block_, shared_bytes_,
           [&params, kernel]() { std::apply(kernel, params); });
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t shared_bytes_;
};

template <typename T> uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp intrinsics move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T> T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace nf_emu

// ---- built-in variables -------------------------------------------------------------------------------
#define threadIdx (::nf_emu::view().thread_idx)
#define blockIdx (::nf_emu::view().block_idx)
#define blockDim (::nf_emu::view().block_dim)
#define gridDim (::nf_emu::view().grid_dim)
constexpr int warpSize = 32;

// ---- intrinsics -----------------------------------------------------------------------------------------
inline void __syncthreads() { ::nf_emu::sync_threads(); }
inline int __syncthreads_count(int p) { return ::nf_emu::sync_threads_count(p); }
inline int __syncthreads_and(int p) {
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  return ::nf_emu::sync_threads_count(p) == static_cast<int>(n);
}
inline int __syncthreads_or(int p) { return ::nf_emu::sync_threads_count(p) > 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::nf_emu::warp_exchange(::nf_emu::WarpOp::kSync, mask, 0, 0, 32);
}
inline unsigned __activemask() { return ::nf_emu::active_mask(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T> T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
  return ::nf_emu::from_bits<T>(
      ::nf_emu::warp_exchange(::nf_emu::WarpOp::kShfl, mask, ::nf_emu::to_bits(var), src, width));
}
template <typename T> T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::nf_emu::from_bits<T>(::nf_emu::warp_exchange(::nf_emu::WarpOp::kShflUp, mask, ::nf_emu::to_bits(var),
                                                         static_cast<int>(delta), width));
}
template <typename T> T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::nf_emu::from_bits<T>(::nf_emu::warp_exchange(::nf_emu::WarpOp::kShflDown, mask, ::nf_emu::to_bits(var),
                                                         static_cast<int>(delta), width));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::nf_emu::from_bits<T>(
      ::nf_emu::warp_exchange(::nf_emu::WarpOp::kShflXor, mask, ::nf_emu::to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(::nf_emu::warp_exchange(::nf_emu::WarpOp::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::nf_emu::warp_exchange(::nf_emu::WarpOp::kAny, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(::nf_emu::warp_exchange(::nf_emu::WarpOp::kAll, mask, predicate != 0, 0, 32));
}

// Atomics: blocks run one at a time, but host threads may launch concurrently.
template <typename T> T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }
template <typename T> T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T> T atomicExch(T* address, T value) { return std::atomic_ref<T>(*address).exchange(value); }

// Device math: the overloads CUDA declares in the global namespace.
using std::abs;
using std::exp;
using std::fabs;
using std::fma;
using std::log;
using std::sqrt;
using std::tanh;
template <typename A, typename B> constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}
template <typename A, typename B> constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }

// ---- runtime API ----------------------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return ::nf_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::nf_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t code) { return ::nf_emu::error_string(code); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// A cooperative launch of a kernel that takes one parameter (a struct of its arguments), as
// cudaLaunchCooperativeKernel passes it: args[0] points to it.
template <typename Param>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(Param), dim3 grid, dim3 block, void** args, size_t shared_bytes,
                                        cudaStream_t) {
  const Param param = *static_cast<const Param*>(args[0]);
  ::nf_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, [&param, kernel]() { kernel(param); },
                   true);
  return ::nf_emu::take_last_error();
}
template <typename... Params>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*)(Params...), int threads,
                                                          size_t shared_bytes) {
  *blocks = ::nf_emu::max_active_blocks(threads, shared_bytes);
  return cudaSuccess;
}
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::nf_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

#include "emu/half.h"
