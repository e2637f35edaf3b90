// Python bindings of the C++ CPU kernels: tensor checks (TORCH_CHECK, never a crash), dtype
// dispatch, raw pointers into the framework-free kernels. Outputs are allocated by the caller
// (Python), so tests can hand in NaN-poisoned buffers.
#include <torch/extension.h>

#include "cpu/masked.h"
#include "cpu/sensitivity.h"

namespace {

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected dtype float32 or float64, got ", t.scalar_type());
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ",
              cols, "], got ", t.sizes());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, name, ": expected a contiguous inner dimension, got strides ",
              t.strides());
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

// weight, grad_weight: [rows, cols] with a contiguous inner dimension (the Python layer
// flattens any rank >= 2 weight into this form without copying where it can).
void neuron_sensitivity_out(const at::Tensor& weight, const at::Tensor& grad_weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& grad_bias,
                            at::Tensor& sensitivity, at::Tensor& taylor) {
  check_cpu_float(weight, "weight");
  const int64_t rows = weight.size(0), cols = weight.dim() == 2 ? weight.size(1) : -1;
  check_rows(weight, "weight", rows, cols);
  check_cpu_float(grad_weight, "grad_weight");
  TORCH_CHECK(grad_weight.scalar_type() == weight.scalar_type(), "grad_weight: expected dtype ",
              weight.scalar_type(), ", got ", grad_weight.scalar_type());
  check_rows(grad_weight, "grad_weight", rows, cols);
  TORCH_CHECK(bias.has_value() == grad_bias.has_value(),
              "bias and grad_bias: expected both or neither, got only one");
  if (bias) check_vector(*bias, "bias", rows, weight.scalar_type());
  if (grad_bias) check_vector(*grad_bias, "grad_bias", rows, weight.scalar_type());
  check_vector(sensitivity, "sensitivity (out)", rows, weight.scalar_type());
  check_vector(taylor, "taylor (out)", rows, weight.scalar_type());
  TORCH_CHECK(sensitivity.is_contiguous() && taylor.is_contiguous(), "outputs must be contiguous");
  if (rows == 0) return;

  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "neuron_sensitivity_cpu", [&] {
    neuronml_fast::cpu::neuron_sensitivity<scalar_t>(
        weight.data_ptr<scalar_t>(), weight.stride(0), grad_weight.data_ptr<scalar_t>(), grad_weight.stride(0),
        bias ? bias->data_ptr<scalar_t>() : nullptr, bias ? bias->stride(0) : 0,
        grad_bias ? grad_bias->data_ptr<scalar_t>() : nullptr, grad_bias ? grad_bias->stride(0) : 0, rows,
        cols, sensitivity.data_ptr<scalar_t>(), taylor.data_ptr<scalar_t>());
  });
}

// ---- masked layers: fused epilogue / prologue around the ATen dense core -------------------

using neuronml_fast::cpu::CompactLayout;

void check_full(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// Compact tensor viewed as [T, N, J, S] with s contiguous: returns the layout and checks bounds.
CompactLayout compact_layout(const at::Tensor& compact, const char* name, int64_t T, int64_t N, int64_t C,
                             int64_t S, at::ScalarType dtype) {
  check_cpu_float(compact, name);
  TORCH_CHECK(compact.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", compact.scalar_type());
  TORCH_CHECK(compact.dim() == 4 && compact.size(0) == T && compact.size(1) == N && compact.size(3) == S, name,
              ": expected a [T, N, slots, S] view with T=", T, " N=", N, " S=", S, ", got ", compact.sizes());
  TORCH_CHECK(S <= 1 || compact.stride(3) == 1, name, ": expected a contiguous last dimension");
  TORCH_CHECK(compact.size(2) <= C, name, ": more slots (", compact.size(2), ") than channels (", C, ")");
  return CompactLayout{T, N, C, S, compact.stride(0), compact.stride(1), compact.stride(2)};
}

void check_slots(const at::Tensor& slot, int64_t T, int64_t C, int64_t slots) {
  TORCH_CHECK(slot.device().is_cpu() && slot.scalar_type() == at::kLong && slot.is_contiguous(),
              "slot: expected a contiguous CPU int64 tensor");
  TORCH_CHECK(slot.sizes() == at::IntArrayRef({T, C}), "slot: expected shape [", T, ", ", C, "], got ", slot.sizes());
  if (slot.numel() > 0) {
    TORCH_CHECK(slot.min().item<int64_t>() >= -1 && slot.max().item<int64_t>() < slots,
                "slot: entries must lie in [-1, ", slots, ")");
  }
}

// y: compact [T, N, J, S]; out, pre: full [T, N, C, S]; mask, bias: [T, C].
void masked_forward_epilogue(const at::Tensor& y, const at::Tensor& slot, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& bias, at::Tensor& out, at::Tensor& pre) {
  TORCH_CHECK(out.dim() == 4, "out: expected a [T, N, C, S] tensor, got ", out.sizes());
  const int64_t T = out.size(0), N = out.size(1), C = out.size(2), S = out.size(3);
  const auto dtype = out.scalar_type();
  check_full(out, "out", out.sizes(), dtype);
  check_full(pre, "pre", out.sizes(), dtype);
  check_full(mask, "mask", {T, C}, dtype);
  if (bias) check_full(*bias, "bias", {T, C}, dtype);
  const CompactLayout L = compact_layout(y, "y", T, N, C, S, dtype);
  check_slots(slot, T, C, y.size(2));
  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_forward_epilogue", [&] {
    neuronml_fast::cpu::masked_forward_epilogue<scalar_t>(
        L, y.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), mask.data_ptr<scalar_t>(),
        bias ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>());
  });
}

// grad_out, grad_pre, pre: full [T, N, C, S]; gy: compact [T, N, J, S] (pre-zeroed where no slot);
// grad_bias, grad_mask: [T, C].
void masked_backward_prologue(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pre,
                              const c10::optional<at::Tensor>& pre, const at::Tensor& slot, const at::Tensor& mask,
                              at::Tensor& gy, at::Tensor& grad_bias, at::Tensor& grad_mask) {
  TORCH_CHECK(grad_out.dim() == 4, "grad_out: expected a [T, N, C, S] tensor, got ", grad_out.sizes());
  const int64_t T = grad_out.size(0), N = grad_out.size(1), C = grad_out.size(2), S = grad_out.size(3);
  const auto dtype = grad_out.scalar_type();
  check_full(grad_out, "grad_out", grad_out.sizes(), dtype);
  if (grad_pre) check_full(*grad_pre, "grad_pre", grad_out.sizes(), dtype);
  if (pre) check_full(*pre, "pre", grad_out.sizes(), dtype);
  check_full(mask, "mask", {T, C}, dtype);
  check_full(grad_bias, "grad_bias", {T, C}, dtype);
  check_full(grad_mask, "grad_mask", {T, C}, dtype);
  const CompactLayout L = compact_layout(gy, "gy", T, N, C, S, dtype);
  check_slots(slot, T, C, gy.size(2));
  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_backward_prologue", [&] {
    neuronml_fast::cpu::masked_backward_prologue<scalar_t>(
        L, grad_out.data_ptr<scalar_t>(), grad_pre ? grad_pre->data_ptr<scalar_t>() : nullptr,
        pre ? pre->data_ptr<scalar_t>() : nullptr, slot.data_ptr<int64_t>(), mask.data_ptr<scalar_t>(),
        gy.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(), grad_mask.data_ptr<scalar_t>());
  });
}

// Channels-last variants: full tensors are [T, N, S, C] views with contiguous channels and
// identical strides; the compact tensor is a [T, N, S, J] view with contiguous slots.
using neuronml_fast::cpu::ChannelsLastLayout;

void check_channels_last(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes() && t.strides() == ref.strides(), name, ": expected shape ", ref.sizes(),
              " and strides ", ref.strides(), ", got ", t.sizes(), " and ", t.strides());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, ": expected contiguous channels");
}

ChannelsLastLayout channels_last_layout(const at::Tensor& full, const at::Tensor& compact, const char* name,
                                        at::ScalarType dtype) {
  TORCH_CHECK(full.dim() == 4, "expected a [T, N, S, C] view, got ", full.sizes());
  const int64_t T = full.size(0), N = full.size(1), S = full.size(2), C = full.size(3);
  check_cpu_float(compact, name);
  TORCH_CHECK(compact.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", compact.scalar_type());
  TORCH_CHECK(compact.dim() == 4 && compact.size(0) == T && compact.size(1) == N && compact.size(2) == S, name,
              ": expected a [T, N, S, slots] view with T=", T, " N=", N, " S=", S, ", got ", compact.sizes());
  TORCH_CHECK(compact.size(3) <= 1 || compact.stride(3) == 1, name, ": expected contiguous slots");
  TORCH_CHECK(compact.size(3) <= C, name, ": more slots (", compact.size(3), ") than channels (", C, ")");
  // Every (t, n, s) row of C channels must lie inside the storage handed in.
  for (const at::Tensor* t : {&full, &compact}) {
    TORCH_CHECK(t->numel() == 0 || t->storage_offset() + (T - 1) * t->stride(0) + (N - 1) * t->stride(1) +
                                           (S - 1) * t->stride(2) + t->size(3) <=
                                       static_cast<int64_t>(t->storage().nbytes() / t->element_size()),
                "tensor view exceeds its storage");
  }
  return ChannelsLastLayout{T, N, C, S, compact.stride(0), compact.stride(1), compact.stride(2),
                            full.stride(0), full.stride(1), full.stride(2)};
}

// y: compact [T, N, S, J]; out, pre: [T, N, S, C] views (same strides); mask, bias: [T, C].
void masked_forward_epilogue_cl(const at::Tensor& y, const at::Tensor& slot, const at::Tensor& mask,
                                const c10::optional<at::Tensor>& bias, at::Tensor& out, at::Tensor& pre) {
  const auto dtype = out.scalar_type();
  const ChannelsLastLayout L = channels_last_layout(out, y, "y", dtype);
  check_channels_last(out, "out", out, dtype);
  check_channels_last(pre, "pre", out, dtype);
  check_full(mask, "mask", {L.T, L.C}, dtype);
  if (bias) check_full(*bias, "bias", {L.T, L.C}, dtype);
  check_slots(slot, L.T, L.C, y.size(3));
  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_forward_epilogue_cl", [&] {
    neuronml_fast::cpu::masked_forward_epilogue_cl<scalar_t>(
        L, y.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), mask.data_ptr<scalar_t>(),
        bias ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>());
  });
}

// grad_out, grad_pre, pre: [T, N, S, C] views (same strides); gy: compact [T, N, S, J],
// pre-zeroed where no slot; grad_bias, grad_mask: [T, C].
void masked_backward_prologue_cl(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pre,
                                 const c10::optional<at::Tensor>& pre, const at::Tensor& slot, const at::Tensor& mask,
                                 at::Tensor& gy, at::Tensor& grad_bias, at::Tensor& grad_mask) {
  const auto dtype = grad_out.scalar_type();
  const ChannelsLastLayout L = channels_last_layout(grad_out, gy, "gy", dtype);
  check_channels_last(grad_out, "grad_out", grad_out, dtype);
  if (grad_pre) check_channels_last(*grad_pre, "grad_pre", grad_out, dtype);
  if (pre) check_channels_last(*pre, "pre", grad_out, dtype);
  check_full(mask, "mask", {L.T, L.C}, dtype);
  check_full(grad_bias, "grad_bias", {L.T, L.C}, dtype);
  check_full(grad_mask, "grad_mask", {L.T, L.C}, dtype);
  check_slots(slot, L.T, L.C, gy.size(3));
  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_backward_prologue_cl", [&] {
    neuronml_fast::cpu::masked_backward_prologue_cl<scalar_t>(
        L, grad_out.data_ptr<scalar_t>(), grad_pre ? grad_pre->data_ptr<scalar_t>() : nullptr,
        pre ? pre->data_ptr<scalar_t>() : nullptr, slot.data_ptr<int64_t>(), mask.data_ptr<scalar_t>(),
        gy.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(), grad_mask.data_ptr<scalar_t>());
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neuronml_fast C++ CPU kernels";
  m.def("neuron_sensitivity_out", &neuron_sensitivity_out, "Per-neuron Taylor sensitivity (SPEC 3)",
        py::arg("weight"), py::arg("grad_weight"), py::arg("bias"), py::arg("grad_bias"), py::arg("sensitivity"),
        py::arg("taylor"));
  m.def("masked_forward_epilogue", &masked_forward_epilogue, "mask * (y + bias) scattered into [T, N, C, S]",
        py::arg("y"), py::arg("slot"), py::arg("mask"), py::arg("bias"), py::arg("out"), py::arg("pre"));
  m.def("masked_backward_prologue", &masked_backward_prologue,
        "compact grad_out * mask + grad_pre, with grad_bias and grad_mask reductions", py::arg("grad_out"),
        py::arg("grad_pre"), py::arg("pre"), py::arg("slot"), py::arg("mask"), py::arg("gy"), py::arg("grad_bias"),
        py::arg("grad_mask"));
  m.def("masked_forward_epilogue_cl", &masked_forward_epilogue_cl, "channels-last masked_forward_epilogue",
        py::arg("y"), py::arg("slot"), py::arg("mask"), py::arg("bias"), py::arg("out"), py::arg("pre"));
  m.def("masked_backward_prologue_cl", &masked_backward_prologue_cl, "channels-last masked_backward_prologue",
        py::arg("grad_out"), py::arg("grad_pre"), py::arg("pre"), py::arg("slot"), py::arg("mask"), py::arg("gy"),
        py::arg("grad_bias"), py::arg("grad_mask"));
}
