#include "cpu/buffer_pool.h"

#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace neuronml_fast::cpu::buffer_pool {
namespace {

constexpr size_t kPage = 4096;
// The block size sits in a header before the data, so `release` needs no lookup table.
constexpr size_t kHeader = kAlignment;

size_t round_to_page(size_t nbytes) { return (nbytes + kPage - 1) / kPage * kPage; }

size_t default_limit() {
  // NEURONML_FAST_CPU_POOL_MB overrides the default of 1 GiB.
  if (const char* mb = std::getenv("NEURONML_FAST_CPU_POOL_MB")) return size_t(std::strtoull(mb, nullptr, 10)) << 20;
  return size_t(1) << 30;
}

struct Pool {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<char*>> free_blocks;  // by usable size
  uint64_t hits = 0, misses = 0, cached_bytes = 0, cached_blocks = 0;
  uint64_t limit = default_limit();

  void drop_all_locked() {
    for (auto& [size, blocks] : free_blocks)
      for (char* block : blocks) std::free(block);
    free_blocks.clear();
    cached_bytes = cached_blocks = 0;
  }
};

// Never destroyed: tensors may release blocks during interpreter shutdown, after static
// destructors ran.
Pool& pool();

// A forked child (a DataLoader worker) inherits the free lists, whose blocks it owns copies of,
// but maybe a mutex another parent thread held at the fork: it gets a fresh one.
void reset_mutex_in_child() { new (&pool().mutex) std::mutex(); }

Pool& pool() {
  static Pool* instance = [] {
    Pool* p = new Pool();
    pthread_atfork(nullptr, nullptr, &reset_mutex_in_child);
    return p;
  }();
  return *instance;
}

size_t& usable_size(char* block) { return *reinterpret_cast<size_t*>(block); }

char* system_allocate(size_t usable) {
  void* block = nullptr;
  if (posix_memalign(&block, kAlignment, kHeader + usable) != 0) throw std::bad_alloc();
  usable_size(static_cast<char*>(block)) = usable;
  return static_cast<char*>(block);
}

}  // namespace

Block acquire(size_t nbytes) {
  if (nbytes == 0) return {nullptr, nullptr};
  const bool pooled = nbytes >= kMinPooledBytes;
  const size_t usable = pooled ? round_to_page(nbytes) : nbytes;
  char* block = nullptr;
  if (pooled) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_blocks.find(usable);
    if (it != p.free_blocks.end() && !it->second.empty()) {
      block = it->second.back();
      it->second.pop_back();
      p.cached_bytes -= usable;
      p.cached_blocks -= 1;
      p.hits += 1;
    } else {
      p.misses += 1;
    }
  }
  if (block == nullptr) block = system_allocate(usable);
  return {block + kHeader, block};
}

void release(void* context) {
  if (context == nullptr) return;
  char* block = static_cast<char*>(context);
  const size_t usable = usable_size(block);
  if (usable >= kMinPooledBytes) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.cached_bytes + usable <= p.limit) {
      p.free_blocks[usable].push_back(block);
      p.cached_bytes += usable;
      p.cached_blocks += 1;
      return;
    }
  }
  std::free(block);
}

Stats stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return {p.hits, p.misses, p.cached_bytes, p.cached_blocks, p.limit};
}

void empty_cache() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.drop_all_locked();
}

void set_limit(uint64_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.limit = bytes;
  if (p.cached_bytes > bytes) p.drop_all_locked();
}

}  // namespace neuronml_fast::cpu::buffer_pool
