// Bindings of batch norm over rows: the fused double backward (csrc/cpu/batch_norm.h).
#include "cpu/bindings/bindings.h"

#include "cpu/batch_norm.h"

namespace neuronml_fast::cpu::bindings {
namespace {

// g, x, grad_g, grad_x: [R, C] contiguous; gamma, mean, invstd, grad_gamma: [C]; u [R, C],
// u_gamma and u_beta [C] optional. One dtype throughout.
void batch_norm_rows_double_backward_out(const c10::optional<at::Tensor>& u, const c10::optional<at::Tensor>& u_gamma,
                                         const c10::optional<at::Tensor>& u_beta, const at::Tensor& g,
                                         const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& mean,
                                         const at::Tensor& invstd, at::Tensor& grad_g, at::Tensor& grad_x,
                                         at::Tensor& grad_gamma) {
  check_cpu_float(x, "input");
  TORCH_CHECK(x.dim() == 2, "input: expected [rows, channels], got shape ", x.sizes());
  const int64_t R = x.size(0), C = x.size(1);
  const auto dtype = x.scalar_type();
  auto matrix = [&](const at::Tensor& t, const char* name) {
    check_cpu_float(t, name);
    checks::check_dtype(t, name, dtype);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == R && t.size(1) == C && t.is_contiguous(), name,
                ": expected a contiguous [", R, ", ", C, "] tensor, got shape ", t.sizes(), " strides ", t.strides());
  };
  auto vector = [&](const at::Tensor& t, const char* name) {
    check_cpu_vector(t, name, C, dtype);
    checks::check_contiguous(t, name);
  };
  matrix(x, "input");
  matrix(g, "grad_out");
  matrix(grad_g, "grad_g (out)");
  matrix(grad_x, "grad_x (out)");
  if (u) matrix(*u, "u");
  vector(gamma, "weight");
  vector(mean, "mean");
  vector(invstd, "invstd");
  vector(grad_gamma, "grad_weight (out)");
  if (u_gamma) vector(*u_gamma, "u_gamma");
  if (u_beta) vector(*u_beta, "u_beta");
  AT_DISPATCH_FLOATING_TYPES(dtype, "batch_norm_rows_double_backward", [&] {
    auto ptr = [](const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<scalar_t>() : nullptr; };
    neuronml_fast::cpu::batch_norm_rows_double_backward<scalar_t>(
        R, C, ptr(u), ptr(u_gamma), ptr(u_beta), g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        gamma.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
        grad_g.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), grad_gamma.data_ptr<scalar_t>());
  });
}

}  // namespace

void bind_batch_norm(py::module_& m) {
  m.def("batch_norm_rows_double_backward_out", &batch_norm_rows_double_backward_out,
        "fused double backward of batch norm over the rows of a [R, C] matrix", py::arg("u"), py::arg("u_gamma"),
        py::arg("u_beta"), py::arg("grad_out"), py::arg("input"), py::arg("weight"), py::arg("mean"),
        py::arg("invstd"), py::arg("grad_g"), py::arg("grad_x"), py::arg("grad_weight"));
}

}  // namespace neuronml_fast::cpu::bindings
