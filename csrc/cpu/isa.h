// Which vector kernels the C++ CPU backend runs, decided at run time. Framework-free.
//
// Why at run time: a wheel is built on one machine and runs on others under a generic platform
// tag, so the extension is compiled for the architecture's baseline (x86-64: SSE2) and its
// AVX2/FMA kernels live in their own functions compiled for that target (avx2_target.h). They run
// only where the CPU reports both features; everything else runs the portable loops, which give
// the same results (tests/test_cpu_isa.py checks both on one machine).
//
// NEURONML_FAST_CPU_ISA=baseline in the environment (read once, at the first query) forces the
// portable loops on any CPU; `set_vector_isa` changes the choice while the process runs.
#pragma once

namespace neuronml_fast::cpu {

enum class VectorIsa : int { kBaseline = 0, kAvx2 = 1 };

// Whether this CPU runs the AVX2/FMA kernels (false on other architectures).
bool cpu_supports_avx2_fma();

// What a process starts with: kAvx2 where the CPU supports it and the environment does not force
// the baseline.
VectorIsa default_vector_isa();

// The kernels in use: default_vector_isa() unless set_vector_isa chose otherwise.
VectorIsa vector_isa();

inline bool use_avx2() { return vector_isa() == VectorIsa::kAvx2; }

// Chooses the kernels for the rest of the process; false (nothing changed) when `isa` is kAvx2
// and the CPU does not support it.
bool set_vector_isa(VectorIsa isa);

}  // namespace neuronml_fast::cpu
