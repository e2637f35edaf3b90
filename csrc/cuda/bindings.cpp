// Python bindings of the CUDA kernels: tensor checks (TORCH_CHECK), device guard, current
// stream, raw pointers into the framework-free launchers, and a check of every launch.
// Outputs are allocated by the caller (Python) so tests can hand in NaN-poisoned buffers.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/sensitivity.h"

namespace {

using neuronml_fast::cuda::DType;

DType to_kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected a float16, bfloat16, float32 or float64 tensor, got ", t);
  }
}

at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), ", got ",
              t.device());
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, kernel, " launch failed: ", cudaGetErrorString(status));
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ",
              cols, "], got ", t.sizes());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, name, ": expected a contiguous inner dimension, got strides ",
              t.strides());
}

void check_vector(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t n, at::ScalarType dtype) {
  check_same_device(t, ref, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

void neuron_sensitivity_out(const at::Tensor& weight, const at::Tensor& grad_weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& grad_bias,
                            at::Tensor& sensitivity, at::Tensor& taylor) {
  TORCH_CHECK(weight.is_cuda(), "weight: expected a CUDA tensor, got device ", weight.device());
  const DType dtype = to_kernel_dtype(weight.scalar_type(), "weight");
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-d [rows, cols] view, got ", weight.sizes());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  check_rows(weight, "weight", rows, cols);
  check_same_device(grad_weight, weight, "grad_weight");
  TORCH_CHECK(grad_weight.scalar_type() == weight.scalar_type(), "grad_weight: expected dtype ",
              weight.scalar_type(), ", got ", grad_weight.scalar_type());
  check_rows(grad_weight, "grad_weight", rows, cols);
  TORCH_CHECK(bias.has_value() == grad_bias.has_value(),
              "bias and grad_bias: expected both or neither, got only one");
  if (bias) check_vector(*bias, weight, "bias", rows, weight.scalar_type());
  if (grad_bias) check_vector(*grad_bias, weight, "grad_bias", rows, weight.scalar_type());
  const at::ScalarType acc = accumulation_dtype(weight.scalar_type());
  check_vector(sensitivity, weight, "sensitivity (out)", rows, acc);
  check_vector(taylor, weight, "taylor (out)", rows, acc);
  TORCH_CHECK(sensitivity.is_contiguous() && taylor.is_contiguous(), "outputs must be contiguous");

  const c10::cuda::CUDAGuard guard(weight.device());
  check_launch(neuronml_fast::cuda::neuron_sensitivity(
                   dtype, weight.data_ptr(), weight.stride(0), grad_weight.data_ptr(), grad_weight.stride(0),
                   bias ? bias->data_ptr() : nullptr, bias ? bias->stride(0) : 0,
                   grad_bias ? grad_bias->data_ptr() : nullptr, grad_bias ? grad_bias->stride(0) : 0, rows, cols,
                   sensitivity.data_ptr(), taylor.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "neuron_sensitivity");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neuronml_fast CUDA C++ kernels";
  m.def("neuron_sensitivity_out", &neuron_sensitivity_out, "Per-neuron Taylor sensitivity (SPEC 3)",
        py::arg("weight"), py::arg("grad_weight"), py::arg("bias"), py::arg("grad_bias"), py::arg("sensitivity"),
        py::arg("taylor"));
}
