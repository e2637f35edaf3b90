#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace neuronml_fast::cpu {

namespace {

constexpr int kUndecided = -1;
std::atomic<int> chosen{kUndecided};

bool baseline_forced_by_environment() {
  const char* value = std::getenv("NEURONML_FAST_CPU_ISA");
  return value != nullptr && std::strcmp(value, "baseline") == 0;
}

}  // namespace

VectorIsa default_vector_isa() {
  return cpu_supports_avx2_fma() && !baseline_forced_by_environment() ? VectorIsa::kAvx2 : VectorIsa::kBaseline;
}

bool cpu_supports_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool supported = [] {
    __builtin_cpu_init();  // a no-op once libgcc's constructor has run; needed before it
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
#else
  return false;
#endif
}

VectorIsa vector_isa() {
  int isa = chosen.load(std::memory_order_relaxed);
  if (isa == kUndecided) {
    isa = static_cast<int>(default_vector_isa());
    chosen.store(isa, std::memory_order_relaxed);  // every racing thread stores the same answer
  }
  return static_cast<VectorIsa>(isa);
}

bool set_vector_isa(VectorIsa isa) {
  if (isa == VectorIsa::kAvx2 && !cpu_supports_avx2_fma()) return false;
  chosen.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

}  // namespace neuronml_fast::cpu
