// A cache of large host buffers for the outputs and workspaces of the C++ CPU backend.
//
// Why: a fresh multi-megabyte allocation from glibc comes from mmap (or a heap top that glibc
// trimmed back to the OS), so every page of it faults on first touch: a 4 MiB activation pays
// ~1.5 ms of page faults before a kernel writes it, more than the masked conv epilogue itself.
// Buffers released to this pool keep their pages and are handed out again for the next request
// of the same size.
//
// Framework-free: the binding wraps `acquire` / `release` into a c10::Allocator. Blocks are
// kept per exact (page-rounded) size up to a byte limit; a block released above the limit is
// freed. Thread-safe.
#pragma once
#include <cstddef>
#include <cstdint>

namespace neuronml_fast::cpu::buffer_pool {

// Data pointers are aligned to this (as PyTorch's CPU allocator does).
constexpr size_t kAlignment = 64;

// Allocations below this size go to the system allocator: its small-block heap does not fault.
constexpr size_t kMinPooledBytes = size_t(128) << 10;

struct Block {
  void* data;     // kAlignment-aligned, at least the requested bytes
  void* context;  // what `release` takes back
};

// A buffer of at least `nbytes` bytes (0 bytes: data == context == nullptr). Throws
// std::bad_alloc when the system is out of memory.
Block acquire(size_t nbytes);

// Returns a block to the pool (or to the system, above the limit or below kMinPooledBytes).
void release(void* context);

struct Stats {
  uint64_t hits;          // requests served from the pool
  uint64_t misses;        // pooled-size requests that allocated new memory
  uint64_t cached_bytes;  // bytes held for reuse now
  uint64_t cached_blocks;
  uint64_t limit_bytes;   // most bytes held for reuse
};

Stats stats();

// Frees every cached block (live buffers are untouched); like torch.cuda.empty_cache().
void empty_cache();

// Sets the most bytes held for reuse (0 disables pooling); empties the cache if it holds more.
void set_limit(uint64_t bytes);

}  // namespace neuronml_fast::cpu::buffer_pool
