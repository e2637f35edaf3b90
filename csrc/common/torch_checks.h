// Tensor checks shared by the CPU and the CUDA bindings (csrc/cpu/bindings/, csrc/cuda/bindings.cpp):
// a wrong argument raises a RuntimeError (TORCH_CHECK) instead of crashing a kernel. Every message
// names the argument, what was expected and what was given; tests match on these texts.
// Header-only and torch-aware: only the bindings include it, never the framework-free kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace neuronml_fast::checks {

// `on_device` is the binding's own test (t.is_cpu(), t.is_cuda(), ...), `device` its name in words.
inline void check_device(const at::Tensor& t, const char* name, bool on_device, const char* device) {
  TORCH_CHECK(on_device, name, ": expected a ", device, " tensor, got device ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

// A [rows, cols] matrix whose rows may be strided (a flattened weight view), elements contiguous.
inline void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ",
              cols, "], got ", t.sizes());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, name, ": expected a contiguous inner dimension, got strides ",
              t.strides());
}

// A [n] vector of one dtype (any stride).
inline void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ", t.sizes());
  check_dtype(t, name, dtype);
}

// The convolution's geometry arguments: one (height, width) pair each.
inline void check_pairs(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected pairs, got ", stride, ", ", padding, " and ", dilation);
}

}  // namespace neuronml_fast::checks
