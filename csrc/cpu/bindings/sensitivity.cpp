// Bindings of the per-neuron Taylor sensitivity (csrc/cpu/sensitivity.h).
#include "cpu/bindings/bindings.h"

#include "cpu/sensitivity.h"

namespace neuronml_fast::cpu::bindings {
namespace {

// weight, grad_weight: [rows, cols] with a contiguous inner dimension (the Python layer
// flattens any rank >= 2 weight into this form without copying where it can).
void neuron_sensitivity_out(const at::Tensor& weight, const at::Tensor& grad_weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& grad_bias,
                            at::Tensor& sensitivity, at::Tensor& taylor) {
  check_cpu_float(weight, "weight");
  const int64_t rows = weight.size(0), cols = weight.dim() == 2 ? weight.size(1) : -1;
  checks::check_rows(weight, "weight", rows, cols);
  check_cpu_float(grad_weight, "grad_weight");
  checks::check_dtype(grad_weight, "grad_weight", weight.scalar_type());
  checks::check_rows(grad_weight, "grad_weight", rows, cols);
  TORCH_CHECK(bias.has_value() == grad_bias.has_value(),
              "bias and grad_bias: expected both or neither, got only one");
  if (bias) check_cpu_vector(*bias, "bias", rows, weight.scalar_type());
  if (grad_bias) check_cpu_vector(*grad_bias, "grad_bias", rows, weight.scalar_type());
  check_cpu_vector(sensitivity, "sensitivity (out)", rows, weight.scalar_type());
  check_cpu_vector(taylor, "taylor (out)", rows, weight.scalar_type());
  checks::check_contiguous(sensitivity, "sensitivity (out)");
  checks::check_contiguous(taylor, "taylor (out)");
  if (rows == 0) return;

  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "neuron_sensitivity_cpu", [&] {
    neuronml_fast::cpu::neuron_sensitivity<scalar_t>(
        weight.data_ptr<scalar_t>(), weight.stride(0), grad_weight.data_ptr<scalar_t>(), grad_weight.stride(0),
        bias ? bias->data_ptr<scalar_t>() : nullptr, bias ? bias->stride(0) : 0,
        grad_bias ? grad_bias->data_ptr<scalar_t>() : nullptr, grad_bias ? grad_bias->stride(0) : 0, rows,
        cols, sensitivity.data_ptr<scalar_t>(), taylor.data_ptr<scalar_t>());
  });
}

}  // namespace

void bind_sensitivity(py::module_& m) {
  m.def("neuron_sensitivity_out", &neuron_sensitivity_out, "Per-neuron Taylor sensitivity (SPEC 3)",
        py::arg("weight"), py::arg("grad_weight"), py::arg("bias"), py::arg("grad_bias"), py::arg("sensitivity"),
        py::arg("taylor"));
}

}  // namespace neuronml_fast::cpu::bindings
