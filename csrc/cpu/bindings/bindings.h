// The C++ CPU extension's bindings, one translation unit per op family, joined in module.cpp:
// tensor checks (TORCH_CHECK, never a crash), dtype dispatch, raw pointers into the
// framework-free kernels. The `*_out` functions and the masked epilogue / prologue write into
// outputs the caller allocated (Python, neuronml_fast/_alloc.py), so tests can hand in
// NaN-poisoned buffers. The rest allocate what they return: the masked conv2d launchers and
// `expand_weight_grad` from the buffer pool, NaN-filled if `poison`; `compact_weight_rows` and
// `masked_compaction` with at::empty (every element written); `pooled_empty` (uninitialized).
//
// Internal to csrc/cpu/bindings/: what the families share.
#pragma once

#include <torch/extension.h>

#include "common/torch_checks.h"

namespace neuronml_fast::cpu::bindings {

// Each registers its family's functions and constants on the module.
void bind_batch_norm(py::module_& m);  // batch_norm.cpp
void bind_conv(py::module_& m);        // conv.cpp: grouped-NHWC layout, conv weight and input gradients
void bind_masked(py::module_& m);      // masked.cpp: compaction, epilogue / prologue, conv2d forward
void bind_plastic(py::module_& m);     // plastic.cpp
void bind_runtime(py::module_& m);     // runtime.cpp: buffer pool, vector ISA
void bind_sensitivity(py::module_& m); // sensitivity.cpp

// torch.empty(size, dtype=dtype) on the CPU, with its storage from the buffer pool (runtime.cpp).
at::Tensor pooled_empty(at::IntArrayRef size, at::ScalarType dtype);

// The task-batched convolution's own kernels, checked (conv.cpp); the masked conv2d backward
// launcher (masked.cpp) calls them too.
void conv2d_weight_grad_out(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight,
                            std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation);
void conv2d_input_grad_out(const at::Tensor& gy, const at::Tensor& weight, at::Tensor& grad_input,
                           std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation);
void to_grouped_nhwc_out(const at::Tensor& src, at::Tensor& dst);

// ---- tensor checks of the CPU kernels' arguments -------------------------------------------

// Shared with the CUDA bindings: csrc/common/torch_checks.h. These add the CPU kernels' own
// contract: a CPU tensor of float32 or float64.
inline void check_cpu_float(const at::Tensor& t, const char* name) {
  checks::check_device(t, name, t.device().is_cpu(), "CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected dtype float32 or float64, got ", t.scalar_type());
}

inline void check_cpu_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  check_cpu_float(t, name);
  checks::check_vector(t, name, n, dtype);
}

inline void check_cpu_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_cpu_float(t, name);
  checks::check_shape(t, name, shape);
  checks::check_dtype(t, name, dtype);
  checks::check_contiguous(t, name);
}

}  // namespace neuronml_fast::cpu::bindings
