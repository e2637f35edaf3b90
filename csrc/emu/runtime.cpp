// The CUDA emulation's runtime: fibers, the block scheduler, warp intrinsics, shared memory and
// launch checks. See cuda_emu.h for the execution model.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu/cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace nf_emu {

namespace {

// ---- fibers -------------------------------------------------------------------------------------------
// On x86-64 a switch saves the callee-saved registers and the floating-point control words on the
// old stack and restores them from the new one: a few nanoseconds, against a system call per switch
// for swapcontext (which the other architectures use).

#if defined(__x86_64__)
extern "C" void nf_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .globl nf_emu_switch
  .hidden nf_emu_switch
  .type nf_emu_switch, @function
nf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size nf_emu_switch, .-nf_emu_switch
  .popsection
)");
#endif

enum class State { kReady, kWarp, kBlock, kGrid, kDone };

struct WarpWait {
  WarpOp op;
  unsigned mask;
  uint64_t bits;
  int arg, width;
  uint64_t result;
  // kCollective only: the call and what runs once the warp has arrived.
  CallSite site{};
  CollectiveRun run = nullptr;
  void* payload = nullptr;
};

struct Thread {
  ThreadView view;
  int warp = 0, lane = 0;
  State state = State::kReady;
  WarpWait wait{};
  int predicate = 0, count = 0;
  size_t shared_allocations = 0;  // how many __shared__ declarations this thread has passed
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct SharedAllocation {
  size_t offset, bytes;
};

struct Block {
  const Body* body = nullptr;
  std::vector<SharedAllocation> allocations;
  size_t dynamic_bytes = 0, static_end = 0, shared_limit = 0;
  cudaError_t error = cudaSuccess;
  std::string message;
};

constexpr uint64_t kCanary = 0x6e66656d7563616eull;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kSharedAlign = 128;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// A block on the emulated device: its threads and its shared-memory arena. A launch keeps one
// resident at a time; a cooperative launch keeps every block of its grid resident.
struct Resident {
  Block block;
  std::vector<Thread> threads;
  std::vector<unsigned char> shared;

  // The block's shared memory: `shared_bytes()` from a kSharedAlign-aligned start (the vector holds
  // kSharedAlign more, so that the start can be aligned wherever the vector's data lies), with
  // static allocations from the start and the dynamic ones at the end.
  unsigned char* shared_base() {
    const auto address = reinterpret_cast<uintptr_t>(shared.data());
    return shared.data() + (round_up(address, kSharedAlign) - address);
  }
  size_t shared_bytes() const { return shared.size() - kSharedAlign; }
  unsigned char* dynamic_shared_of(size_t dynamic_bytes) {
    return shared_base() + shared_bytes() - round_up(dynamic_bytes, kSharedAlign);
  }
};

// One per host thread that launches kernels: the fiber stacks, the shared-memory arena and the
// scheduler's own stack pointer.
struct Worker {
  char* stacks = nullptr;
  size_t stack_bytes = 0, stack_count = 0;
  std::vector<Resident> residents;
  Resident* resident = nullptr;  // the block whose threads run
  Block* block = nullptr;        // its Block
  bool cooperative = false;      // the launch keeps every block resident (grid barriers allowed)
  Thread* current = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif

  ~Worker() {
    if (stacks != nullptr) munmap(stacks, stack_count * (stack_bytes + kGuardBytes));
  }

  char* stack_of(size_t i) { return stacks + i * (stack_bytes + kGuardBytes) + kGuardBytes; }

  bool reserve(size_t threads_needed) {
    const size_t wanted = static_cast<size_t>(config().stack_bytes);
    if (stacks != nullptr && stack_count >= threads_needed && stack_bytes == wanted) return true;
    if (stacks != nullptr) munmap(stacks, stack_count * (stack_bytes + kGuardBytes));
    stacks = nullptr;
    stack_bytes = round_up(wanted, kGuardBytes);
    stack_count = std::max<size_t>(threads_needed, 32);
    const size_t total = stack_count * (stack_bytes + kGuardBytes);
    void* memory = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) return false;
    stacks = static_cast<char*>(memory);
    for (size_t i = 0; i < stack_count; ++i) mprotect(stacks + i * (stack_bytes + kGuardBytes), kGuardBytes, PROT_NONE);
    return true;
  }
};

thread_local Worker worker;

std::mutex attributes_mutex;
std::unordered_map<const void*, int>& max_dynamic_shared_of() {
  static std::unordered_map<const void*, int> map;
  return map;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local cudaError_t last_message_code = cudaSuccess;
thread_local std::string last_message;
thread_local std::string error_text;

const char* error_name(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}

cudaError_t set_error(cudaError_t code, std::string message) {
  last_error = code;
  last_message_code = code;
  last_message = "CUDA emulation: " + std::move(message);
  ++stats().failed_launches;
  return code;
}

// ---- switching ------------------------------------------------------------------------------------------

[[noreturn]] void fiber_main();

#if defined(__x86_64__)
void start_fiber(Thread& t, size_t index) {
  char* top = worker.stack_of(index) + worker.stack_bytes;
  *reinterpret_cast<uint64_t*>(worker.stack_of(index)) = kCanary;
  auto* slot = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr = 0;
  uint16_t fpu = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu));
  slot[-1] = 0;                                         // fiber_main never returns
  slot[-2] = reinterpret_cast<uint64_t>(&fiber_main);   // where the first switch's `ret` goes
  for (int r = 3; r <= 8; ++r) slot[-r] = 0;            // rbp, rbx, r12-r15
  slot[-9] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpu) << 32);
  t.sp = &slot[-9];
}

void resume(Thread& t) {
  worker.current = &t;
  ++stats().switches;
  nf_emu_switch(&worker.scheduler_sp, t.sp);
  worker.current = nullptr;
}

void suspend(Thread& t) { nf_emu_switch(&t.sp, worker.scheduler_sp); }
#else
void start_fiber(Thread& t, size_t index) {
  *reinterpret_cast<uint64_t*>(worker.stack_of(index)) = kCanary;
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = worker.stack_of(index);
  t.context.uc_stack.ss_size = worker.stack_bytes;
  t.context.uc_link = nullptr;
  makecontext(&t.context, reinterpret_cast<void (*)()>(&fiber_main), 0);
}

void resume(Thread& t) {
  worker.current = &t;
  ++stats().switches;
  swapcontext(&worker.scheduler, &t.context);
  worker.current = nullptr;
}

void suspend(Thread& t) { swapcontext(&t.context, &worker.scheduler); }
#endif

[[noreturn]] void fiber_main() {
  Thread* t = worker.current;
  (*worker.block->body)();
  t->state = State::kDone;
  suspend(*t);
  std::abort();  // a finished thread is never resumed
}

Thread& running() {
  if (worker.current == nullptr) {
    std::fprintf(stderr, "CUDA emulation: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *worker.current;
}

std::string where(const Thread& t) {
  return "block (" + std::to_string(t.view.block_idx.x) + "," + std::to_string(t.view.block_idx.y) + "," +
         std::to_string(t.view.block_idx.z) + ") warp " + std::to_string(t.warp) + " lane " + std::to_string(t.lane);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kCollective: return "a warp-collective operation";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSync: return "__syncwarp";
  }
  return "?";
}

// "__shfl_sync", or "wmma::mma_sync (file.cu:12)" for a collective operation.
std::string wait_name(const WarpWait& w) {
  if (w.op != WarpOp::kCollective) return op_name(w.op);
  std::string file = w.site.file;
  const size_t slash = file.find_last_of('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return std::string(w.site.function) + " (" + file + ":" + std::to_string(w.site.line) + ")";
}

bool same_site(const CallSite& a, const CallSite& b) {
  return a.line == b.line && a.column == b.column && std::strcmp(a.function, b.function) == 0 &&
         std::strcmp(a.file, b.file) == 0;
}

// Whether lane `t` waits at the same warp operation as `w`: the same intrinsic and mask, and for a
// collective operation the same call.
bool same_operation(const WarpWait& w, const Thread& t) {
  if (t.state != State::kWarp || t.wait.op != w.op || t.wait.mask != w.mask) return false;
  return w.op != WarpOp::kCollective || (t.wait.run == w.run && same_site(t.wait.site, w.site));
}

void block_error(cudaError_t code, std::string message) {
  Block& b = *worker.block;
  if (b.error == cudaSuccess) {
    b.error = code;
    b.message = std::move(message);
  }
}

// ---- warps ------------------------------------------------------------------------------------------------

std::vector<int> ordering(int n, uint64_t salt) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (config().order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (config().order == Order::kRandom) {
    std::mt19937_64 rng(config().seed * 0x9e3779b97f4a7c15ull + salt);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

int source_lane(const WarpWait& w, int lane) {
  const int width = w.width, base = lane & ~(width - 1), offset = lane & (width - 1);
  switch (w.op) {
    case WarpOp::kShfl: return base + (w.arg & (width - 1));
    case WarpOp::kShflUp: return offset < w.arg ? lane : lane - w.arg;
    case WarpOp::kShflDown: return offset + w.arg >= width ? lane : lane + w.arg;
    case WarpOp::kShflXor: {
      const int src = lane ^ w.arg;
      return (src & ~(width - 1)) == base ? src : lane;
    }
    default: return lane;
  }
}

// What lane `t`, which is not at the operation its warp waits at, does instead ("" while it runs).
std::string elsewhere(const Thread& t) {
  switch (t.state) {
    case State::kDone: return "has exited";
    case State::kBlock: return "waits at __syncthreads";
    case State::kGrid: return "waits at the grid barrier";
    case State::kWarp:
      return "waits at " + wait_name(t.wait) +
             (t.wait.op == WarpOp::kCollective ? std::string() : " with mask " + std::to_string(t.wait.mask));
    case State::kReady: return "";
  }
  return "";
}

// Completes the collective operation that `first` waits at once all 32 lanes of its warp have
// reached the same call.
bool resolve_collective(Thread* lanes[32], int first) {
  const WarpWait& w = lanes[first]->wait;
  int present = 0;
  for (int i = 0; i < 32; ++i) present += lanes[i] != nullptr;
  if (present < 32) {
    block_error(cudaErrorLaunchFailure, wait_name(w) + " at " + where(*lanes[first]) + ": the warp has " +
                                            std::to_string(present) + " threads, and a warp-collective matrix "
                                            "operation needs all 32 (undefined behaviour on a GPU)");
    return false;
  }
  for (int i = 0; i < 32; ++i) {
    const Thread& t = *lanes[i];
    if (same_operation(w, t)) continue;
    if (t.state == State::kReady) return false;
    block_error(cudaErrorLaunchFailure, wait_name(w) + " at " + where(*lanes[first]) + ": lane " + std::to_string(i) +
                                            " " + elsewhere(t) + "; every lane of the warp must reach the same call "
                                            "(undefined behaviour on a GPU)");
    return false;
  }
  void* payloads[32];
  for (int i = 0; i < 32; ++i) payloads[i] = lanes[i]->wait.payload;
  const std::string problem = w.run(payloads);
  if (!problem.empty()) {
    block_error(cudaErrorLaunchFailure, wait_name(w) + " at " + where(*lanes[first]) + ": " + problem);
    return false;
  }
  for (int i = 0; i < 32; ++i) lanes[i]->state = State::kReady;
  return true;
}

// Completes the warp operation that `first` waits at, if every lane it names has reached it.
// Returns false when some lane of the group has not arrived yet; fails the launch on misuse.
bool resolve_group(Thread* lanes[32], int first) {
  const WarpWait& w = lanes[first]->wait;
  if (((w.mask >> first) & 1u) == 0) {
    block_error(cudaErrorLaunchFailure, wait_name(w) + " at " + where(*lanes[first]) +
                                            ": the calling lane is not in its mask");
    return false;
  }
  if (w.op == WarpOp::kCollective) return resolve_collective(lanes, first);
  if (w.width < 1 || w.width > 32 || (w.width & (w.width - 1)) != 0) {
    block_error(cudaErrorLaunchFailure, std::string(op_name(w.op)) + " at " + where(*lanes[first]) +
                                            ": width must be a power of two <= 32, got " + std::to_string(w.width));
    return false;
  }
  for (int i = 0; i < 32; ++i) {
    if (((w.mask >> i) & 1u) == 0 || lanes[i] == nullptr) continue;  // lanes past the block size
    const Thread& t = *lanes[i];
    if (same_operation(w, t)) continue;
    if (t.state == State::kReady) return false;
    block_error(cudaErrorLaunchFailure, wait_name(w) + " with mask " + std::to_string(w.mask) + " at " +
                                            where(*lanes[first]) + ": lane " + std::to_string(i) + " " +
                                            elsewhere(t) + " (undefined behaviour on a GPU)");
    return false;
  }
  uint64_t ballot = 0;
  for (int i = 0; i < 32; ++i) {
    if (((w.mask >> i) & 1u) != 0 && lanes[i] != nullptr && lanes[i]->wait.bits != 0) ballot |= 1ull << i;
  }
  for (int i = 0; i < 32; ++i) {
    if (((w.mask >> i) & 1u) == 0 || lanes[i] == nullptr) continue;
    Thread& t = *lanes[i];
    switch (w.op) {
      case WarpOp::kBallot: t.wait.result = ballot; break;
      case WarpOp::kAny: t.wait.result = ballot != 0; break;
      case WarpOp::kAll: {
        uint64_t present = 0;
        for (int k = 0; k < 32; ++k) present |= (((w.mask >> k) & 1u) != 0 && lanes[k] != nullptr) ? 1ull << k : 0;
        t.wait.result = ballot == present;
        break;
      }
      case WarpOp::kSync: t.wait.result = 0; break;
      default: {
        const int src = source_lane(t.wait, i);
        if (((w.mask >> src) & 1u) == 0 || lanes[src] == nullptr) {
          block_error(cudaErrorLaunchFailure, wait_name(w) + " at " + where(t) + " reads lane " +
                                                  std::to_string(src) + ", which is not in the mask " +
                                                  std::to_string(w.mask) + " (undefined value on a GPU)");
          return false;
        }
        t.wait.result = lanes[src]->wait.bits;
      }
    }
  }
  for (int i = 0; i < 32; ++i) {
    if (((w.mask >> i) & 1u) != 0 && lanes[i] != nullptr) lanes[i]->state = State::kReady;
  }
  return true;
}

// Runs a warp's lanes until each waits at __syncthreads or has exited, completing its warp
// operations as their groups fill.
void run_warp(std::vector<Thread>& threads, int warp, uint64_t salt) {
  Thread* lanes[32] = {};
  const int first = warp * 32;
  const int count = std::min<int>(32, static_cast<int>(threads.size()) - first);
  for (int i = 0; i < count; ++i) lanes[i] = &threads[first + i];
  const std::vector<int> lane_order = ordering(count, salt);
  for (uint64_t round = 0;; ++round) {
    for (int i : lane_order) {
      if (lanes[i]->state == State::kReady) resume(*lanes[i]);
      if (worker.block->error != cudaSuccess) return;
    }
    bool progressed = false;
    for (int i : lane_order) {
      if (lanes[i]->state == State::kWarp && resolve_group(lanes, i)) progressed = true;
      if (worker.block->error != cudaSuccess) return;
    }
    if (!progressed) return;
  }
}

// Runs a block until each of its threads has exited or waits at the grid barrier, completing its
// __syncthreads barriers as they fill.
void run_block(Resident& r, uint64_t salt) {
  Block& block = r.block;
  std::vector<Thread>& threads = r.threads;
  worker.resident = &r;
  worker.block = &block;
  const int warps = static_cast<int>((threads.size() + 31) / 32);
  for (uint64_t phase = 0;; ++phase) {
    for (int w : ordering(warps, salt + phase * 7919)) {
      run_warp(threads, w, salt + phase * 104729 + static_cast<uint64_t>(w));
      if (block.error != cudaSuccess) return;
    }
    int done = 0, at_barrier = 0, at_grid = 0, predicates = 0;
    for (const Thread& t : threads) {
      done += t.state == State::kDone;
      at_barrier += t.state == State::kBlock;
      at_grid += t.state == State::kGrid;
      predicates += t.state == State::kBlock && t.predicate != 0;
    }
    if (done + at_grid == static_cast<int>(threads.size())) return;
    if (done + at_barrier + at_grid != static_cast<int>(threads.size())) {
      for (const Thread& t : threads) {
        if (t.state == State::kWarp) {
          block_error(cudaErrorLaunchFailure, wait_name(t.wait) + " at " + where(t) +
                                                  " can never complete: other threads wait at __syncthreads "
                                                  "(a deadlock on a GPU)");
          return;
        }
      }
    }
    if (at_grid > 0) {
      for (const Thread& t : threads) {
        if (t.state == State::kBlock) {
          block_error(cudaErrorLaunchFailure, "__syncthreads at " + where(t) +
                                                  " can never complete: other threads of its block wait at the grid "
                                                  "barrier (a deadlock on a GPU)");
          return;
        }
      }
    }
    for (Thread& t : threads) {
      if (t.state == State::kBlock) {
        t.state = State::kReady;
        t.count = predicates;
      }
    }
  }
}

bool check_stacks(size_t threads) {
  for (size_t i = 0; i < threads; ++i) {
    if (*reinterpret_cast<uint64_t*>(worker.stack_of(i)) != kCanary) return false;
  }
  return true;
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
  const Config& c = config();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > static_cast<uint64_t>(c.max_threads_per_block) || block.x > 1024 || block.y > 1024 ||
      block.z > 64) {
    return set_error(cudaErrorInvalidConfiguration, "block " + dims(block) + " has " + std::to_string(threads) +
                                                        " threads; a block holds 1 to " +
                                                        std::to_string(c.max_threads_per_block) +
                                                        " (x, y <= 1024, z <= 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > c.max_grid_x || grid.y > c.max_grid_yz ||
      grid.z > c.max_grid_yz) {
    return set_error(cudaErrorInvalidConfiguration, "grid " + dims(grid) + " is outside the device's limits: x in [1, " +
                                                        std::to_string(c.max_grid_x) + "], y and z in [1, " +
                                                        std::to_string(c.max_grid_yz) + "]");
  }
  int max_dynamic = static_cast<int>(c.default_shared_bytes);
  {
    std::lock_guard<std::mutex> lock(attributes_mutex);
    const auto it = max_dynamic_shared_of().find(kernel);
    if (it != max_dynamic_shared_of().end()) max_dynamic = it->second;
  }
  if (shared_bytes > static_cast<size_t>(max_dynamic)) {
    return set_error(cudaErrorInvalidValue,
                     std::to_string(shared_bytes) + " bytes of dynamic shared memory, over the kernel's limit of " +
                         std::to_string(max_dynamic) + " (raise it with cudaFuncSetAttribute, up to " +
                         std::to_string(c.optin_shared_bytes) + ")");
  }
  return cudaSuccess;
}

}  // namespace

Config& config() {
  static Config c;
  return c;
}

Stats& stats() {
  static Stats s;
  return s;
}

ThreadView& view() { return running().view; }

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width) {
  Thread& t = running();
  t.wait = WarpWait{op, mask, bits, arg, width, 0};
  t.state = State::kWarp;
  suspend(t);
  return t.wait.result;
}

void warp_collective(const CallSite& site, CollectiveRun run, void* payload) {
  Thread& t = running();
  t.wait = WarpWait{WarpOp::kCollective, 0xffffffffu, 0, 0, 32, 0, site, run, payload};
  t.state = State::kWarp;
  suspend(t);
}

const int* fragment_order(uint64_t kind, int count) {
  struct Key {
    uint64_t kind, seed;
    Order order;
    int count;
    bool operator==(const Key&) const = default;
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<uint64_t>()(k.kind * 0x9e3779b97f4a7c15ull ^ k.seed ^ (static_cast<uint64_t>(k.order) << 61) ^
                                   static_cast<uint64_t>(k.count));
    }
  };
  thread_local std::unordered_map<Key, std::vector<int>, Hash> orders;
  const Key key{kind, config().seed, config().order, count};
  auto it = orders.find(key);
  if (it == orders.end()) {
    std::vector<int> order(count);
    std::iota(order.begin(), order.end(), 0);
    if (key.order == Order::kReverse) {
      std::reverse(order.begin(), order.end());
    } else if (key.order == Order::kRandom) {
      std::mt19937_64 rng(key.seed * 0x2545f4914f6cdd1dull + kind);
      std::shuffle(order.begin(), order.end(), rng);
    }
    it = orders.emplace(key, std::move(order)).first;
  }
  return it->second.data();
}

void sync_threads() { sync_threads_count(0); }

void grid_sync() {
  Thread& t = running();
  if (!worker.cooperative) {
    fail(cudaErrorLaunchFailure, ("grid barrier at " + where(t) +
                                  " outside a cooperative launch (cudaLaunchCooperativeKernel): its blocks need not be "
                                  "resident together")
                                     .c_str());
  }
  t.state = State::kGrid;
  suspend(t);
}

int max_active_blocks(int threads, size_t shared_bytes) {
  const Config& c = config();
  if (threads <= 0) return 0;
  const int64_t by_threads = c.threads_per_multiprocessor / threads;
  const int64_t by_shared = static_cast<int64_t>(c.shared_bytes_per_multiprocessor) /
                            static_cast<int64_t>(round_up(shared_bytes, kSharedAlign) + 1024);  // 1 KiB reserved a block
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>({by_threads, by_shared, 32})));
}

int sync_threads_count(int predicate) {
  Thread& t = running();
  t.predicate = predicate;
  t.state = State::kBlock;
  suspend(t);
  return t.count;
}

unsigned active_mask() {
  Thread& t = running();
  unsigned mask = 0;
  const std::vector<Thread>& threads = worker.resident->threads;
  const size_t first = static_cast<size_t>(t.warp) * 32;
  for (size_t i = first; i < first + 32 && i < threads.size(); ++i) {
    if (threads[i].state != State::kDone) mask |= 1u << (i - first);
  }
  return mask;
}

void* static_shared(size_t bytes, size_t align) {
  Thread& t = running();
  Block& b = *worker.block;
  const size_t index = t.shared_allocations++;
  if (index < b.allocations.size()) {
    if (b.allocations[index].bytes != bytes) {
      fail(cudaErrorLaunchFailure, ("__shared__ declaration " + std::to_string(index) + " at " + where(t) +
                                    " differs in size between threads of one block").c_str());
    }
    return worker.resident->shared_base() + b.allocations[index].offset;
  }
  const size_t offset = round_up(b.static_end, std::max(align, size_t{16}));
  if (offset + bytes > static_cast<size_t>(config().default_shared_bytes) ||
      offset + bytes > b.shared_limit) {
    fail(cudaErrorLaunchOutOfResources,
         ("static shared memory of " + std::to_string(offset + bytes) + " bytes (plus " +
          std::to_string(b.dynamic_bytes) + " dynamic) exceeds the block's limit of " +
          std::to_string(std::min<size_t>(b.shared_limit, config().default_shared_bytes)) + " static bytes")
             .c_str());
  }
  b.allocations.push_back({offset, bytes});
  b.static_end = offset + bytes;
  std::memset(worker.resident->shared_base() + offset, 0xff, bytes);
  return worker.resident->shared_base() + offset;
}

void* dynamic_shared() {
  running();
  Block& b = *worker.block;
  return worker.resident->dynamic_shared_of(b.dynamic_bytes);
}

void fail(cudaError_t code, const char* message) {
  Thread& t = running();
  block_error(code, message);
  t.state = State::kDone;
  suspend(t);
  std::abort();
}

namespace {

// Makes `r` block `linear` of the launch: fresh threads (fibers on stacks from `first_stack` on),
// poisoned dynamic shared memory, no static allocations yet.
void start_block(Resident& r, uint64_t linear, dim3 grid, dim3 block_dim, size_t shared_bytes, const Body& body,
                 size_t first_stack) {
  const size_t threads = static_cast<size_t>(block_dim.x) * block_dim.y * block_dim.z;
  const size_t arena = round_up(static_cast<size_t>(config().optin_shared_bytes), kSharedAlign) + 2 * kSharedAlign;
  if (r.shared.size() != arena) r.shared.assign(arena, 0xff);
  r.block = Block{};
  r.block.body = &body;
  r.block.dynamic_bytes = shared_bytes;
  r.block.shared_limit = shared_bytes > static_cast<size_t>(config().default_shared_bytes)
                             ? static_cast<size_t>(config().optin_shared_bytes)
                             : static_cast<size_t>(config().default_shared_bytes);
  r.block.shared_limit -= std::min(r.block.shared_limit, shared_bytes);
  std::memset(r.dynamic_shared_of(shared_bytes), 0xff, round_up(shared_bytes, kSharedAlign));
  const uint3 block_idx{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>((linear / grid.x) % grid.y),
                        static_cast<unsigned>(linear / (static_cast<uint64_t>(grid.x) * grid.y))};
  r.threads.assign(threads, Thread{});
  worker.resident = &r;
  worker.block = &r.block;
  for (size_t i = 0; i < threads; ++i) {
    Thread& t = r.threads[i];
    t.view = ThreadView{{static_cast<unsigned>(i % block_dim.x), static_cast<unsigned>((i / block_dim.x) % block_dim.y),
                         static_cast<unsigned>(i / (block_dim.x * block_dim.y))},
                        block_idx, block_dim, grid};
    t.warp = static_cast<int>(i / 32);
    t.lane = static_cast<int>(i % 32);
    start_fiber(t, first_stack + i);
  }
}

// The grid of a cooperative launch, every block resident: the blocks run by turns, each until its
// threads wait at the grid barrier (or have exited); when all of them wait there, the barrier
// opens for every thread.
void run_cooperative(std::vector<Resident>& residents, size_t count, uint64_t salt) {
  for (uint64_t turn = 0;; ++turn) {
    for (int k : ordering(static_cast<int>(count), salt + turn * 31337)) {
      run_block(residents[k], salt + static_cast<uint64_t>(k) * 7 + turn * 104729);
      if (residents[k].block.error != cudaSuccess) return;
    }
    const Thread* exited = nullptr;
    const Thread* waiting = nullptr;
    for (size_t k = 0; k < count; ++k) {
      for (const Thread& t : residents[k].threads) {
        if (t.state == State::kDone && exited == nullptr) exited = &t;
        if (t.state == State::kGrid && waiting == nullptr) waiting = &t;
      }
    }
    if (waiting == nullptr) return;  // every thread has exited
    if (exited != nullptr) {
      worker.block = &residents.front().block;
      block_error(cudaErrorLaunchFailure, "the grid barrier at " + where(*waiting) + " can never complete: " +
                                              where(*exited) + " has exited (a deadlock on a GPU)");
      return;
    }
    ++stats().grid_barriers;
    for (size_t k = 0; k < count; ++k) {
      for (Thread& t : residents[k].threads) t.state = State::kReady;
    }
  }
}

}  // namespace

cudaError_t launch(const void* kernel, dim3 grid, dim3 block_dim, size_t shared_bytes, const Body& body,
                   bool cooperative) {
  ++stats().launches;
  if (worker.current != nullptr) {
    return set_error(cudaErrorLaunchFailure, "a kernel launched another (dynamic parallelism) is not emulated");
  }
  if (const cudaError_t err = check_launch(kernel, grid, block_dim, shared_bytes); err != cudaSuccess) return err;
  const size_t threads = static_cast<size_t>(block_dim.x) * block_dim.y * block_dim.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (cooperative) {
    const uint64_t most = static_cast<uint64_t>(max_active_blocks(static_cast<int>(threads), shared_bytes)) *
                          static_cast<uint64_t>(config().multiprocessors);
    if (blocks > most) {
      return set_error(cudaErrorCooperativeLaunchTooLarge,
                       "a cooperative launch of " + std::to_string(blocks) + " blocks; the device holds at most " +
                           std::to_string(most) + " such blocks at once");
    }
  }
  if (config().count_only) return cudaSuccess;
  const size_t resident_count = cooperative ? blocks : 1;
  if (!worker.reserve(threads * resident_count)) {
    return set_error(cudaErrorMemoryAllocation, "no memory for the fiber stacks");
  }
  if (worker.residents.size() < resident_count) worker.residents.resize(resident_count);

  const uint64_t salt = stats().launches.load() * 0x2545f4914f6cdd1dull;
  std::vector<uint64_t> order;
  if (config().order == Order::kRandom && blocks > 1) {
    order.resize(blocks);
    std::iota(order.begin(), order.end(), uint64_t{0});
    std::mt19937_64 rng(config().seed + salt);
    std::shuffle(order.begin(), order.end(), rng);
  }
  const auto linear_of = [&](uint64_t n) {
    return order.empty() ? (config().order == Order::kReverse ? blocks - 1 - n : n) : order[n];
  };
  worker.cooperative = cooperative;
  cudaError_t error = cudaSuccess;
  std::string message;
  const auto take_error = [&](const Block& b) {
    if (error == cudaSuccess && b.error != cudaSuccess) {
      error = b.error;
      message = b.message;
    }
  };
  if (cooperative) {
    for (uint64_t n = 0; n < blocks; ++n) {
      start_block(worker.residents[n], linear_of(n), grid, block_dim, shared_bytes, body, n * threads);
    }
    run_cooperative(worker.residents, blocks, salt);
    for (uint64_t n = 0; n < blocks; ++n) take_error(worker.residents[n].block);
    stats().blocks += blocks;
    stats().threads += blocks * threads;
  } else {
    Resident& r = worker.residents.front();
    for (uint64_t n = 0; n < blocks && error == cudaSuccess; ++n) {
      const uint64_t linear = linear_of(n);
      start_block(r, linear, grid, block_dim, shared_bytes, body, 0);
      run_block(r, salt + linear);
      ++stats().blocks;
      stats().threads += threads;
      take_error(r.block);
    }
  }
  if (!check_stacks(threads * resident_count) && error == cudaSuccess) {
    error = cudaErrorLaunchOutOfResources;
    message = "a thread overflowed its " + std::to_string(worker.stack_bytes) + "-byte emulated stack";
  }
  worker.block = nullptr;
  worker.resident = nullptr;
  worker.cooperative = false;
  if (error != cudaSuccess) return set_error(error, message);
  return cudaSuccess;
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > config().optin_shared_bytes) {
    return set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(bytes) +
                                                " bytes of dynamic shared memory, over the device's opt-in maximum of " +
                                                std::to_string(config().optin_shared_bytes));
  }
  std::lock_guard<std::mutex> lock(attributes_mutex);
  max_dynamic_shared_of()[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

cudaError_t peek_last_error() { return last_error; }

const char* error_string(cudaError_t code) {
  error_text = error_name(code);
  if (code != cudaSuccess && code == last_message_code && !last_message.empty()) error_text += " (" + last_message + ")";
  return error_text.c_str();
}

}  // namespace nf_emu

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const nf_emu::Config& c = nf_emu::config();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = static_cast<int>(c.max_threads_per_block); break;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(c.max_grid_x); break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(c.max_grid_yz); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(c.default_shared_bytes); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = static_cast<int>(c.multiprocessors); break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(c.optin_shared_bytes); break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
