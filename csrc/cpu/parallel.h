// OpenMP helpers shared by the C++ CPU kernels (they also build without OpenMP: one thread).
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace neuronml_fast::cpu {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Below this many elements a loop runs on the calling thread: waking the OpenMP team costs more
// than the work (and under oversubscription, far more).
constexpr int64_t kParallelGrain = 1 << 15;

}  // namespace neuronml_fast::cpu
