// Compiles the code between NEURONML_FAST_AVX2_BEGIN and NEURONML_FAST_AVX2_END for AVX2 + FMA,
// whatever -march the translation unit has, so one build runs on any CPU of the architecture and
// dispatches to that code at run time (isa.h). NEURONML_FAST_HAS_AVX2_TARGET is 1 where such code
// can be compiled (x86 with GCC or Clang), else 0 and the callers keep the portable loops.
//
// Rules for code in such a region (a function compiled for AVX2 and called on a CPU without it
// crashes with an illegal instruction):
//  * include every header (the standard library, <immintrin.h>) before the region, so no inline
//    function they define is compiled for AVX2;
//  * give everything in it internal linkage (an anonymous namespace) or a name in namespace
//    `avx2`, so the linker never merges it with a portable function of the same name;
//  * call it only where use_avx2() (isa.h) is true.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define NEURONML_FAST_HAS_AVX2_TARGET 1
#include <immintrin.h>
#if defined(__clang__)
#define NEURONML_FAST_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define NEURONML_FAST_AVX2_END _Pragma("clang attribute pop")
#else
#define NEURONML_FAST_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define NEURONML_FAST_AVX2_END _Pragma("GCC pop_options")
#endif
#else
#define NEURONML_FAST_HAS_AVX2_TARGET 0
#endif
