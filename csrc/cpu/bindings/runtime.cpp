// Bindings of the runtime services: the buffer pool large outputs come from
// (csrc/cpu/buffer_pool.h) and the vector kernels chosen at run time (csrc/cpu/isa.h).
#include "cpu/bindings/bindings.h"

#include "cpu/buffer_pool.h"
#include "cpu/isa.h"

namespace neuronml_fast::cpu::bindings {
namespace {

// ---- buffer pool: large outputs keep their pages between calls -----------------------------

namespace pool = neuronml_fast::cpu::buffer_pool;

void release_pooled(void* context) { pool::release(context); }

struct PooledAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const pool::Block block = pool::acquire(nbytes);
    return {block.data, block.context, &release_pooled, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Never destroyed: storages keep a pointer to their allocator for resizing.
PooledAllocator* pooled_allocator() {
  static PooledAllocator* instance = new PooledAllocator();
  return instance;
}

py::dict pool_stats() {
  const pool::Stats s = pool::stats();
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["cached_bytes"] = s.cached_bytes;
  d["cached_blocks"] = s.cached_blocks;
  d["limit_bytes"] = s.limit_bytes;
  return d;
}

// ---- vector kernels chosen at run time (csrc/cpu/isa.h) ------------------------------------

std::string vector_isa() {
  return neuronml_fast::cpu::vector_isa() == neuronml_fast::cpu::VectorIsa::kAvx2 ? "avx2" : "baseline";
}

void set_vector_isa(const std::string& name) {
  using neuronml_fast::cpu::VectorIsa;
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "baseline",
              "isa: expected 'auto', 'avx2' or 'baseline', got '", name, "'");
  const VectorIsa isa = name == "auto"   ? neuronml_fast::cpu::default_vector_isa()
                        : name == "avx2" ? VectorIsa::kAvx2
                                         : VectorIsa::kBaseline;
  TORCH_CHECK(neuronml_fast::cpu::set_vector_isa(isa), "isa 'avx2': this CPU lacks AVX2 or FMA");
}

// Whether the whole extension was compiled with AVX enabled (NEURONML_FAST_MARCH=native on such a
// CPU): then it runs only on CPUs like the build machine, whatever vector_isa() says.
#if defined(__AVX__)
constexpr bool kCompiledWithAvx = true;
#else
constexpr bool kCompiledWithAvx = false;
#endif

}  // namespace

// torch.empty(size, dtype=dtype) on the CPU, with its storage from the buffer pool.
at::Tensor pooled_empty(at::IntArrayRef size, at::ScalarType dtype) {
  for (int64_t s : size) TORCH_CHECK(s >= 0, "size: expected non-negative sizes, got ", size);
  return at::detail::empty_generic(size, pooled_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

void bind_runtime(py::module_& m) {
  m.def("pooled_empty", &pooled_empty, "torch.empty on the CPU from the buffer pool (csrc/cpu/buffer_pool.h)",
        py::arg("size"), py::arg("dtype"));
  m.attr("pool_min_bytes") = py::int_(pool::kMinPooledBytes);  // smaller requests bypass the pool
  m.def("pool_stats", &pool_stats, "hits, misses, cached bytes and blocks, limit of the CPU buffer pool");
  m.def("pool_empty_cache", &pool::empty_cache, "free every cached block of the CPU buffer pool");
  m.def("pool_set_limit", &pool::set_limit, "most bytes the CPU buffer pool holds for reuse (0: off)",
        py::arg("bytes"));
  m.def("vector_isa", &vector_isa,
        "the vector kernels in use: 'avx2' (AVX2 and FMA) or 'baseline' (portable loops; "
        "NEURONML_FAST_CPU_ISA=baseline forces them)");
  m.def("set_vector_isa", &set_vector_isa,
        "choose the vector kernels for the rest of the process: 'auto' (the default: this CPU's best unless "
        "NEURONML_FAST_CPU_ISA=baseline), 'avx2' or 'baseline'",
        py::arg("isa"));
  m.attr("compiled_with_avx") = py::bool_(kCompiledWithAvx);
}

}  // namespace neuronml_fast::cpu::bindings
