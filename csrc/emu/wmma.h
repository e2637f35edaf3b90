// The WMMA API (`nvcuda::wmma`, the toolkit's <mma.h>) of the CUDA emulation: warp-level matrix
// multiply-accumulate on the shapes and types the convolution kernels use.
//
//   shape      matrix_a / matrix_b                    accumulator
//   m16n16k16  __half or __nv_bfloat16, row|col_major float
//   m16n16k8   precision::tf32 (float storage)        float
//   m8n8k4     double                                 double
//
// Semantics, as documented for the GPU:
// * load_matrix_sync, store_matrix_sync and mma_sync are warp-collective: every lane of the warp
//   waits until all 32 have reached the same call, then the operation runs once for the warp.
//   A lane that exited, waits elsewhere, or a warp of fewer than 32 threads fails the launch, as
//   do lanes that disagree on the pointer, the leading dimension or the layout, a pointer that is
//   not 256-bit aligned, and a leading dimension that is not a multiple of 16 bytes.
// * fill_fragment and the elements `x[0 .. num_elements)` are per thread, no synchronization.
// * Which matrix element a lane's `x[i]` holds is unspecified on a GPU. Here lane `l`'s `x[i]` is
//   element `p = fragment_order(kind)[i * 32 + l]` of the fragment's matrix (A: M x K, B: K x N,
//   accumulator: M x N), row `p / cols`, column `p % cols`; the order is the identity in forward
//   warp order, reversed in reverse order and a seeded permutation in random order
//   (`nf_emu::fragment_order`), so code that relies on a mapping gets different results across
//   the three orders the tests run. Fragments of one type share the mapping, so element-wise
//   work between them (scaling an accumulator, adding a loaded C) is valid, as on a GPU.
//   num_elements is the fragment's elements over 32; the toolkit's may be larger (16 for a
//   16 x 16 __half matrix_a), so code must loop to num_elements rather than assume a count.
// * mma_sync computes D = A * B + C. Products of two __half, __nv_bfloat16 or tf32 values are
//   exact in float; they are added to C in k order with float rounding (round to nearest even).
//   NVIDIA leaves the internal order and rounding of the tensor cores' float accumulation
//   unspecified: kernels compare against references with float-accumulation tolerances. tf32
//   operands are first rounded to a 10-bit mantissa as __float_to_tf32 (cvt.rna.tf32.f32) rounds,
//   which leaves already converted values unchanged. double: an IEEE fused multiply-add chain in k
//   order, the DMMA's exact fp64 arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>

#include "emu/cuda_emu.h"

namespace nvcuda::wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}

enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa; the low 13 bits
// of the result are zero. NaN stays NaN.
inline float __float_to_tf32(float in) {
  const uint32_t bits = ::nf_emu::float_bits(in);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return ::nf_emu::bits_float(0x7fffffffu);
  return ::nf_emu::bits_float((bits + 0x1000u) & 0xffffe000u);
}

}  // namespace nvcuda::wmma

namespace nf_emu::wmma {

namespace w = ::nvcuda::wmma;

enum class Use : uint64_t { kA = 1, kB = 2, kAccumulator = 3 };

template <typename U> constexpr Use use_of() {
  if constexpr (std::is_same_v<U, w::matrix_a>) return Use::kA;
  else if constexpr (std::is_same_v<U, w::matrix_b>) return Use::kB;
  else return Use::kAccumulator;
}

// The storage of an element type: tf32 is kept in a float.
template <typename T> struct Storage {
  using type = T;
};
template <> struct Storage<w::precision::tf32> {
  using type = float;
};

template <typename U, int M, int N, int K, typename T, typename Layout> constexpr bool supported() {
  constexpr bool ab = std::is_same_v<U, w::matrix_a> || std::is_same_v<U, w::matrix_b>;
  constexpr bool layout = std::is_same_v<Layout, w::row_major> || std::is_same_v<Layout, w::col_major>;
  if constexpr (std::is_same_v<U, w::accumulator>) {
    return std::is_void_v<Layout> && ((M == 16 && N == 16 && (K == 16 || K == 8) && std::is_same_v<T, float>) ||
                                      (M == 8 && N == 8 && K == 4 && std::is_same_v<T, double>));
  } else {
    return ab && layout &&
           ((M == 16 && N == 16 && K == 16 && (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)) ||
            (M == 16 && N == 16 && K == 8 && std::is_same_v<T, w::precision::tf32>) ||
            (M == 8 && N == 8 && K == 4 && std::is_same_v<T, double>));
  }
}

// The fragment's matrix: A is M x K, B is K x N, the accumulator M x N.
template <typename U, int M, int N, int K> constexpr int rows_of() {
  return std::is_same_v<U, w::matrix_b> ? K : M;
}
template <typename U, int M, int N, int K> constexpr int cols_of() {
  return std::is_same_v<U, w::matrix_a> ? K : N;
}

template <typename T> constexpr uint64_t element_code() {
  if constexpr (std::is_same_v<T, __half>) return 1;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 2;
  else if constexpr (std::is_same_v<T, w::precision::tf32>) return 3;
  else if constexpr (std::is_same_v<T, float>) return 4;
  else return 5;
}

template <typename Use_, int M, int N, int K, typename T, typename Layout>
struct FragmentBase {
  static_assert(supported<Use_, M, N, K, T, Layout>(),
                "this WMMA fragment is not emulated (csrc/emu/wmma.h lists the shapes and types that are)");
  static constexpr int kRows = rows_of<Use_, M, N, K>(), kCols = cols_of<Use_, M, N, K>();
  static constexpr bool kColMajor = std::is_same_v<Layout, w::col_major>;
  // Identifies the fragment type to `fragment_order`: fragments of one type share their mapping.
  static constexpr uint64_t kKind = static_cast<uint64_t>(use_of<Use_>()) | element_code<T>() << 4 |
                                    static_cast<uint64_t>(kColMajor) << 8 | static_cast<uint64_t>(M) << 16 |
                                    static_cast<uint64_t>(N) << 24 | static_cast<uint64_t>(K) << 32;

  enum { num_elements = kRows * kCols / 32 };
  enum { num_storage_elements = num_elements };
  using element_type = T;
  using storage_element_type = typename Storage<T>::type;
  storage_element_type x[num_elements];
};

struct Position {
  int row, col;
};

// Row and column of lane `lane`'s element `slot` in a fragment of type F (`order`: F's mapping).
template <typename F> Position position(const int* order, int lane, int slot) {
  const int p = order[slot * 32 + lane];
  return {p / F::kCols, p % F::kCols};
}

inline CallSite call_site(const char* function, const std::source_location& where) {
  return CallSite{function, where.file_name(), static_cast<unsigned>(where.line()),
                  static_cast<unsigned>(where.column())};
}

// What every lane must pass alike to a load or store.
template <typename P> std::string agree(void* const payloads[32]) {
  const P& first = *static_cast<const P*>(payloads[0]);
  for (int lane = 1; lane < 32; ++lane) {
    const P& p = *static_cast<const P*>(payloads[lane]);
    if (p.memory != first.memory || p.ldm != first.ldm || p.col_major != first.col_major) {
      return "lanes 0 and " + std::to_string(lane) +
             " pass different arguments (pointer, leading dimension or layout must be the same in every lane)";
    }
  }
  const auto address = reinterpret_cast<uintptr_t>(first.memory);
  if (address % 32 != 0) {
    char hex[32];
    std::snprintf(hex, sizeof hex, "%#llx", static_cast<unsigned long long>(address));
    return std::string("the pointer ") + hex + " is not 256-bit (32-byte) aligned";
  }
  const size_t bytes = sizeof(*first.memory);
  if ((first.ldm * bytes) % 16 != 0) {
    return "the leading dimension " + std::to_string(first.ldm) + " is not a multiple of 16 bytes (" +
           std::to_string(16 / bytes) + " elements)";
  }
  return {};
}

template <typename F, typename S> struct Load {
  typename F::storage_element_type* x;
  const S* memory;
  unsigned ldm;
  bool col_major;

  static std::string run(void* const payloads[32]) {
    if (std::string problem = agree<Load>(payloads); !problem.empty()) return problem;
    const int* order = fragment_order(F::kKind, F::kRows * F::kCols);
    for (int lane = 0; lane < 32; ++lane) {
      const Load& p = *static_cast<const Load*>(payloads[lane]);
      for (int slot = 0; slot < F::num_elements; ++slot) {
        const auto at = position<F>(order, lane, slot);
        const size_t offset = p.col_major ? static_cast<size_t>(at.col) * p.ldm + at.row
                                          : static_cast<size_t>(at.row) * p.ldm + at.col;
        p.x[slot] = p.memory[offset];
      }
    }
    return {};
  }
};

template <typename F, typename S> struct Store {
  const typename F::storage_element_type* x;
  S* memory;
  unsigned ldm;
  bool col_major;

  static std::string run(void* const payloads[32]) {
    if (std::string problem = agree<Store>(payloads); !problem.empty()) return problem;
    const int* order = fragment_order(F::kKind, F::kRows * F::kCols);
    for (int lane = 0; lane < 32; ++lane) {
      const Store& p = *static_cast<const Store*>(payloads[lane]);
      for (int slot = 0; slot < F::num_elements; ++slot) {
        const auto at = position<F>(order, lane, slot);
        const size_t offset = p.col_major ? static_cast<size_t>(at.col) * p.ldm + at.row
                                          : static_cast<size_t>(at.row) * p.ldm + at.col;
        p.memory[offset] = p.x[slot];
      }
    }
    return {};
  }
};

// One multiplicand as the tensor core reads it.
template <typename T, typename S> auto operand(const S& v) {
  if constexpr (std::is_same_v<T, w::precision::tf32>) return w::__float_to_tf32(v);
  else if constexpr (std::is_same_v<T, double>) return v;
  else return static_cast<float>(v);
}

template <typename D, typename A, typename B, typename C> struct Mma {
  typename D::storage_element_type* d;
  const typename A::storage_element_type* a;
  const typename B::storage_element_type* b;
  const typename C::storage_element_type* c;

  static constexpr int kM = A::kRows, kK = A::kCols, kN = B::kCols;
  using Acc = typename D::storage_element_type;

  // Gathers a whole matrix from the 32 lanes' fragments.
  template <typename F, typename Value, typename Get>
  static void gather(void* const payloads[32], Value* matrix, Get get) {
    const int* order = fragment_order(F::kKind, F::kRows * F::kCols);
    for (int lane = 0; lane < 32; ++lane) {
      const Mma& p = *static_cast<const Mma*>(payloads[lane]);
      for (int slot = 0; slot < F::num_elements; ++slot) {
        const auto at = position<F>(order, lane, slot);
        matrix[at.row * F::kCols + at.col] = get(p, slot);
      }
    }
  }

  static std::string run(void* const payloads[32]) {
    using In = decltype(operand<typename A::element_type>(std::declval<typename A::storage_element_type>()));
    In a[kM * kK], b[kK * kN];
    Acc c[kM * kN];
    gather<A>(payloads, a, [](const Mma& p, int i) { return operand<typename A::element_type>(p.a[i]); });
    gather<B>(payloads, b, [](const Mma& p, int i) { return operand<typename B::element_type>(p.b[i]); });
    gather<C>(payloads, c, [](const Mma& p, int i) { return p.c[i]; });
    // Every operand is read before any lane's D is written: D may be C.
    const int* order = fragment_order(D::kKind, kM * kN);
    for (int lane = 0; lane < 32; ++lane) {
      const Mma& p = *static_cast<const Mma*>(payloads[lane]);
      for (int slot = 0; slot < D::num_elements; ++slot) {
        const auto at = position<D>(order, lane, slot);
        Acc sum = c[at.row * kN + at.col];
        for (int k = 0; k < kK; ++k) {
          sum = std::fma(static_cast<Acc>(a[at.row * kK + k]), static_cast<Acc>(b[k * kN + at.col]), sum);
        }
        p.d[slot] = sum;
      }
    }
    return {};
  }
};

}  // namespace nf_emu::wmma

namespace nvcuda::wmma {

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment : public ::nf_emu::wmma::FragmentBase<Use, M, N, K, T, Layout> {};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  using S = typename fragment<Use, M, N, K, T, Layout>::storage_element_type;
  const S v = static_cast<S>(value);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

// matrix_a or matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                             const typename fragment<Use, M, N, K, T, Layout>::storage_element_type* p, unsigned ldm,
                             std::source_location where = std::source_location::current()) {
  static_assert(!std::is_void_v<Layout>, "an accumulator is loaded with a layout_t argument");
  using F = fragment<Use, M, N, K, T, Layout>;
  ::nf_emu::wmma::Load<F, typename F::storage_element_type> payload{f.x, p, ldm, F::kColMajor};
  ::nf_emu::warp_collective(::nf_emu::wmma::call_site("wmma::load_matrix_sync", where), &decltype(payload)::run,
                            &payload);
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout,
                             std::source_location where = std::source_location::current()) {
  using F = fragment<accumulator, M, N, K, T>;
  ::nf_emu::wmma::Load<F, T> payload{f.x, p, ldm, layout == mem_col_major};
  ::nf_emu::warp_collective(::nf_emu::wmma::call_site("wmma::load_matrix_sync", where), &decltype(payload)::run,
                            &payload);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              std::source_location where = std::source_location::current()) {
  using F = fragment<accumulator, M, N, K, T>;
  ::nf_emu::wmma::Store<F, T> payload{f.x, p, ldm, layout == mem_col_major};
  ::nf_emu::warp_collective(::nf_emu::wmma::call_site("wmma::store_matrix_sync", where), &decltype(payload)::run,
                            &payload);
}

template <int M, int N, int K, typename Tab, typename LayoutA, typename LayoutB, typename Tc>
inline void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Tab, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, Tab, LayoutB>& b, const fragment<accumulator, M, N, K, Tc>& c,
                     std::source_location where = std::source_location::current()) {
  using Acc = fragment<accumulator, M, N, K, Tc>;
  using Mma = ::nf_emu::wmma::Mma<Acc, fragment<matrix_a, M, N, K, Tab, LayoutA>,
                                  fragment<matrix_b, M, N, K, Tab, LayoutB>, Acc>;
  Mma payload{d.x, a.x, b.x, c.x};
  ::nf_emu::warp_collective(::nf_emu::wmma::call_site("wmma::mma_sync", where), &Mma::run, &payload);
}

}  // namespace nvcuda::wmma
