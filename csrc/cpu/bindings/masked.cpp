// Bindings of the masked layers (csrc/cpu/masked.h): the compaction of the active neurons, the
// fused epilogue / prologue around the ATen dense core, and the masked conv2d forward launcher.
#include "cpu/bindings/bindings.h"

#include <limits>

#include "common/conv_size.h"
#include "cpu/masked.h"

namespace neuronml_fast::cpu::bindings {
namespace {

// ---- fused epilogue / prologue around the ATen dense core ----------------------------------

void check_slots(const at::Tensor& slot, int64_t T, int64_t C, int64_t slots) {
  TORCH_CHECK(slot.device().is_cpu() && slot.scalar_type() == at::kLong && slot.is_contiguous(),
              "slot: expected a contiguous CPU int64 tensor, got ", slot.scalar_type(), " on ", slot.device(),
              " with strides ", slot.strides());
  TORCH_CHECK(slot.sizes() == at::IntArrayRef({T, C}), "slot: expected shape [", T, ", ", C, "], got ", slot.sizes());
  const int64_t* s = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot.numel(); ++i)  // a raw loop: two ATen reductions cost more than the kernel
    TORCH_CHECK(s[i] >= -1 && s[i] < slots, "slot: entries must lie in [-1, ", slots, "), got ", s[i]);
}

// Full tensors are [T, N, S, C] views with identical strides and contiguous channels (channels
// last) or contiguous pixels (channels first: a [T, N, C, H, W] contiguous tensor); the compact
// tensor is a [T, N, S, J] view with contiguous slots.
using neuronml_fast::cpu::MaskedLayout;

// Whether two views of one shape address their elements alike. A dimension of size 1 is never
// stepped along, so its stride does not count: [N, 1, H, W] is both contiguous and channels last.
bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype) {
  check_cpu_float(t, name);
  checks::check_dtype(t, name, dtype);
  TORCH_CHECK(t.sizes() == ref.sizes() && same_strides(t, ref), name, ": expected shape ", ref.sizes(),
              " and strides ", ref.strides(), ", got ", t.sizes(), " and ", t.strides());
}

// The channel stride of a full [T, N, S, C] view: 1 (channels last), or that of a view whose pixels
// are contiguous.
int64_t channel_stride(const at::Tensor& full, const char* name) {
  if (full.size(3) <= 1 || full.stride(3) == 1) return 1;
  TORCH_CHECK(full.size(2) <= 1 || full.stride(2) == 1, name,
              ": expected contiguous channels or contiguous pixels, got strides ", full.strides());
  return full.stride(3);
}

// Whether every element of the view lies inside the storage handed in.
bool inside_storage(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return last < static_cast<int64_t>(t.storage().nbytes() / t.element_size());
}

MaskedLayout masked_layout(const at::Tensor& full, const char* full_name, const at::Tensor& compact,
                           const char* name, at::ScalarType dtype) {
  TORCH_CHECK(full.dim() == 4, "expected a [T, N, S, C] view, got ", full.sizes());
  const int64_t T = full.size(0), N = full.size(1), S = full.size(2), C = full.size(3);
  check_cpu_float(compact, name);
  checks::check_dtype(compact, name, dtype);
  TORCH_CHECK(compact.dim() == 4 && compact.size(0) == T && compact.size(1) == N && compact.size(2) == S, name,
              ": expected a [T, N, S, slots] view with T=", T, " N=", N, " S=", S, ", got ", compact.sizes());
  TORCH_CHECK(compact.size(3) <= 1 || compact.stride(3) == 1, name, ": expected contiguous slots");
  TORCH_CHECK(compact.size(3) <= C, name, ": more slots (", compact.size(3), ") than channels (", C, ")");
  TORCH_CHECK(inside_storage(full) && inside_storage(compact), "tensor view exceeds its storage");
  return MaskedLayout{T, N, C, S, compact.stride(0), compact.stride(1), compact.stride(2),
                      full.stride(0), full.stride(1), full.stride(2), channel_stride(full, full_name)};
}

// y: compact [T, N, S, J]; out, pre: [T, N, S, C] views (same strides); mask, bias: [T, C].
void masked_forward_epilogue_out(const at::Tensor& y, const at::Tensor& slot, const at::Tensor& mask,
                                const c10::optional<at::Tensor>& bias, at::Tensor& out, at::Tensor& pre) {
  const auto dtype = out.scalar_type();
  const MaskedLayout L = masked_layout(out, "out", y, "y", dtype);
  check_like(out, "out", out, dtype);
  check_like(pre, "pre", out, dtype);
  check_cpu_tensor(mask, "mask", {L.T, L.C}, dtype);
  if (bias) check_cpu_tensor(*bias, "bias", {L.T, L.C}, dtype);
  check_slots(slot, L.T, L.C, y.size(3));
  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_forward_epilogue_out", [&] {
    neuronml_fast::cpu::masked_forward_epilogue<scalar_t>(
        L, y.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), mask.data_ptr<scalar_t>(),
        bias ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>());
  });
}

// grad_out, grad_pre, pre: [T, N, S, C] views (same strides); gy: compact [T, N, S, J],
// pre-zeroed where no slot; grad_bias, grad_mask: [T, C].
void masked_backward_prologue_out(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pre,
                                 const c10::optional<at::Tensor>& pre, const at::Tensor& slot, const at::Tensor& mask,
                                 at::Tensor& gy, at::Tensor& grad_bias, at::Tensor& grad_mask) {
  const auto dtype = grad_out.scalar_type();
  const MaskedLayout L = masked_layout(grad_out, "grad_out", gy, "gy", dtype);
  check_like(grad_out, "grad_out", grad_out, dtype);
  if (grad_pre) check_like(*grad_pre, "grad_pre", grad_out, dtype);
  if (pre) check_like(*pre, "pre", grad_out, dtype);
  check_cpu_tensor(mask, "mask", {L.T, L.C}, dtype);
  check_cpu_tensor(grad_bias, "grad_bias", {L.T, L.C}, dtype);
  check_cpu_tensor(grad_mask, "grad_mask", {L.T, L.C}, dtype);
  check_slots(slot, L.T, L.C, gy.size(3));
  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_backward_prologue_out", [&] {
    neuronml_fast::cpu::masked_backward_prologue<scalar_t>(
        L, grad_out.data_ptr<scalar_t>(), grad_pre ? grad_pre->data_ptr<scalar_t>() : nullptr,
        pre ? pre->data_ptr<scalar_t>() : nullptr, slot.data_ptr<int64_t>(), mask.data_ptr<scalar_t>(),
        gy.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(), grad_mask.data_ptr<scalar_t>());
  });
}

// ---- compaction of the active neurons -------------------------------------------------------

// mask [T, C] -> (slot [T, C] int64, width, compacted, complete): see plan_compaction.
// The plan of a contiguous [T, C] mask; fills `slot` ([T, C] int64, allocated here).
neuronml_fast::cpu::CompactionPlan compaction_plan(const at::Tensor& mask, bool skip_zero, bool allow,
                                                   at::Tensor& slot) {
  slot = at::empty(mask.sizes(), mask.options().dtype(at::kLong));
  neuronml_fast::cpu::CompactionPlan plan{};
  AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "masked_compaction_cpu", [&] {
    plan = neuronml_fast::cpu::plan_compaction<scalar_t>(mask.data_ptr<scalar_t>(), mask.size(0), mask.size(1),
                                                         skip_zero, allow, slot.data_ptr<int64_t>());
  });
  return plan;
}

py::tuple masked_compaction(const at::Tensor& mask, bool skip_zero, bool allow) {
  check_cpu_float(mask, "mask");
  TORCH_CHECK(mask.dim() == 2, "mask: expected [T, C], got shape ", mask.sizes());
  at::Tensor slot;
  const neuronml_fast::cpu::CompactionPlan plan = compaction_plan(mask.contiguous(), skip_zero, allow, slot);
  return py::make_tuple(slot, plan.width, plan.compacted, plan.complete);
}

// rows [T, C, R] with a contiguous last dimension (any outer strides), compact [T, width, R]
// contiguous: gather (rows -> compact, zero padding) or scatter (compact -> rows, zeros for pruned).
void check_row_tensors(const at::Tensor& full, const at::Tensor& compact, const at::Tensor& slot, int64_t width) {
  check_cpu_float(full, "rows");
  check_cpu_float(compact, "compact");
  checks::check_dtype(compact, "compact", full.scalar_type());
  TORCH_CHECK(full.dim() == 3 && compact.dim() == 3 && compact.size(0) == full.size(0) &&
                  compact.size(1) == width && compact.size(2) == full.size(2),
              "expected rows [T, C, R] and compact [T, width=", width, ", R]; got ", full.sizes(), " and ",
              compact.sizes());
  check_slots(slot, full.size(0), full.size(1), width);
}

void scatter_rows_out(const at::Tensor& compact, const at::Tensor& slot, at::Tensor& rows) {
  check_row_tensors(rows, compact, slot, compact.size(1));
  TORCH_CHECK(compact.size(2) <= 1 || compact.stride(2) == 1, "compact: expected a contiguous last dimension");
  checks::check_contiguous(rows, "rows (out)");
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "scatter_rows_cpu", [&] {
    neuronml_fast::cpu::scatter_rows<scalar_t>(compact.data_ptr<scalar_t>(), compact.stride(0), compact.stride(1),
                                               rows.size(0), rows.size(1), rows.size(2), slot.data_ptr<int64_t>(),
                                               rows.data_ptr<scalar_t>());
  });
}

// ---- masked conv2d forward: the whole launcher in C++ ---------------------------------------
// The Python version of this glue (compaction, pooled outputs, compact weights, the grouped views
// around one ATen convolution, the epilogue) cost 8 % of a 25 %-active Conv4 block's forward.
// It allocates its outputs (out, pre) from the pool. Layouts: neuronml_fast/cpu/masked.py.

// [T, N, C, H, W] stored as [N, H, W, T, C] (grouped NHWC), from the pool, NaN-filled if `poison`.
at::Tensor grouped_nhwc_empty(int64_t T, int64_t N, int64_t C, int64_t H, int64_t W, at::ScalarType dtype,
                              bool poison) {
  at::Tensor storage = pooled_empty({N, H, W, T, C}, dtype);
  if (poison) storage.fill_(std::numeric_limits<double>::quiet_NaN());
  return storage.permute({3, 0, 4, 1, 2});
}

// weight [T, C, ...] -> [T, width, ...] with the rows of kept channels in their slots (zero rows for
// slots no channel uses), in weight's storage order (channels-last conv weights stay so).
at::Tensor compact_weight_rows(const at::Tensor& weight, const at::Tensor& slot, int64_t width) {
  check_cpu_float(weight, "weight");
  TORCH_CHECK(weight.dim() >= 3, "weight: expected [T, C, ...], got shape ", weight.sizes());
  const int64_t T = weight.size(0), C = weight.size(1);
  check_slots(slot, T, C, width);
  int64_t row = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) row *= weight.size(d);
  const bool channels_last = weight.dim() == 5 && weight.permute({0, 1, 3, 4, 2}).is_contiguous();
  const at::Tensor rows = channels_last ? weight.permute({0, 1, 3, 4, 2}).reshape({T, C, row})
                                        : weight.reshape({T, C, row}).contiguous();
  at::Tensor compact = at::empty({T, width, row}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "compact_weight_rows", [&] {
    neuronml_fast::cpu::gather_rows<scalar_t>(rows.data_ptr<scalar_t>(), rows.stride(0), rows.stride(1), T, C, row,
                                              slot.data_ptr<int64_t>(), width, compact.data_ptr<scalar_t>());
  });
  std::vector<int64_t> shape = weight.sizes().vec();
  shape[1] = width;
  if (!channels_last) return compact.view(shape);
  return compact.view({T, width, weight.size(3), weight.size(4), weight.size(2)}).permute({0, 1, 4, 2, 3});
}

// grad [T, width, C_in, kH, kW] with channels-last strides (the weight gradient of the compact
// weights) -> [T, C, C_in, kH, kW] with the same strides: row slot[t, c] for kept channels, zeros
// for pruned ones. In a pooled buffer, NaN-filled first if `poison`.
at::Tensor expand_weight_grad(const at::Tensor& grad, const at::Tensor& slot, bool poison) {
  check_cpu_float(grad, "grad");
  TORCH_CHECK(grad.dim() == 5 && grad.permute({0, 1, 3, 4, 2}).is_contiguous(),
              "grad: expected a [T, width, C_in, kH, kW] tensor with channels-last strides, got shape ", grad.sizes(),
              " and strides ", grad.strides());
  const int64_t T = grad.size(0), C = slot.size(1), C_in = grad.size(2), KH = grad.size(3), KW = grad.size(4);
  check_slots(slot, T, C, grad.size(1));
  at::Tensor full = pooled_empty({T, C, KH, KW, C_in}, grad.scalar_type());
  if (poison) full.fill_(std::numeric_limits<double>::quiet_NaN());
  const int64_t row = KH * KW * C_in;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "expand_weight_grad", [&] {
    neuronml_fast::cpu::scatter_rows<scalar_t>(grad.data_ptr<scalar_t>(), grad.size(1) * row, row, T, C, row,
                                               slot.data_ptr<int64_t>(), full.data_ptr<scalar_t>());
  });
  return full.permute({0, 1, 4, 2, 3});
}

// A [T, N, C, H, W] output from the pool: contiguous, or in grouped NHWC.
at::Tensor conv_output_empty(int64_t T, int64_t N, int64_t C, int64_t H, int64_t W, at::ScalarType dtype,
                             bool contiguous, bool poison) {
  if (!contiguous) return grouped_nhwc_empty(T, N, C, H, W, dtype, poison);
  at::Tensor out = pooled_empty({T, N, C, H, W}, dtype);
  if (poison) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// x [T, N, C_in, H, W] (any layout; grouped NHWC is a view), weight [T, C, C_in/groups, kH, kW],
// mask and bias [T, C] -> (out, pre) [T, N, C, H_out, W_out], contiguous if `contiguous` (the
// layout PyTorch's conv2d gives a contiguous input), else in grouped NHWC.
std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                                         const at::Tensor& mask, const c10::optional<at::Tensor>& bias,
                                                         std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                         std::vector<int64_t> dilation, int64_t groups, bool skip_zero,
                                                         bool contiguous, bool poison) {
  check_cpu_float(x, "input");
  TORCH_CHECK(x.dim() == 5 && weight.dim() == 5 && weight.size(0) == x.size(0),
              "expected input [T, N, C_in, H, W] and weight [T, C_out, C_in/groups, kH, kW], got ", x.sizes(), " and ",
              weight.sizes());
  checks::check_pairs(stride, padding, dilation);
  const int64_t T = x.size(0), N = x.size(1), C_in = x.size(2), C = weight.size(1);
  const int64_t H_out = neuronml_fast::conv_output_size(x.size(3), weight.size(3), stride[0], padding[0], dilation[0]);
  const int64_t W_out = neuronml_fast::conv_output_size(x.size(4), weight.size(4), stride[1], padding[1], dilation[1]);
  const auto dtype = x.scalar_type();
  checks::check_dtype(weight, "weight", dtype);
  const at::Tensor m = mask.contiguous();
  check_cpu_tensor(m, "mask", {T, C}, dtype);
  const c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  if (b) check_cpu_tensor(*b, "bias", {T, C}, dtype);
  at::Tensor out = conv_output_empty(T, N, C, H_out, W_out, dtype, contiguous, poison);
  at::Tensor pre = conv_output_empty(T, N, C, H_out, W_out, dtype, contiguous, poison);
  if (out.numel() == 0) return {out, pre};
  at::Tensor slot;
  const neuronml_fast::cpu::CompactionPlan plan = compaction_plan(m, skip_zero, groups == 1, slot);
  const int64_t A = plan.width, S = H_out * W_out;
  at::Tensor y;  // [T, N, S, A] view, slots contiguous
  if (A == 0) {
    y = at::zeros({T, N, S, 0}, x.options());
  } else {
    const at::Tensor w = plan.compacted ? compact_weight_rows(weight, slot, A) : weight;
    // [T*A, C_in/g, kH, kW] channels-last: a view of channels-last weights, else one copy (an
    // expanded weight, MAML's meta-parameters for every task, included).
    const at::Tensor grouped_w =
        w.permute({0, 1, 3, 4, 2}).reshape({T * A, w.size(3), w.size(4), w.size(2)}).contiguous().permute({0, 3, 1, 2});
    // The tasks become conv groups: [N, T*C_in, H, W] channels-last over grouped-NHWC storage.
    const at::Tensor storage = x.permute({1, 3, 4, 0, 2}).contiguous();
    const at::Tensor grouped_x =
        storage.view({N, x.size(3), x.size(4), T * C_in}).permute({0, 3, 1, 2});
    at::Tensor conv = at::convolution(grouped_x, grouped_w, c10::nullopt, stride, padding, dilation, false, {0, 0},
                                      groups * T);
    y = conv.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).view({N, S, T, A}).permute({2, 0, 1, 3});
  }
  const auto rows = [&](const at::Tensor& t) { return t.permute({0, 1, 3, 4, 2}).flatten(2, 3); };
  at::Tensor out_rows = rows(out), pre_rows = rows(pre);
  masked_forward_epilogue_out(y, slot, m, b, out_rows, pre_rows);
  return {out, pre};
}

}  // namespace

void bind_masked(py::module_& m) {
  m.def("masked_forward_epilogue_out", &masked_forward_epilogue_out, "channels-last masked_forward_epilogue",
        py::arg("y"), py::arg("slot"), py::arg("mask"), py::arg("bias"), py::arg("out"), py::arg("pre"));
  m.def("masked_backward_prologue_out", &masked_backward_prologue_out, "channels-last masked_backward_prologue",
        py::arg("grad_out"), py::arg("grad_pre"), py::arg("pre"), py::arg("slot"), py::arg("mask"), py::arg("gy"),
        py::arg("grad_bias"), py::arg("grad_mask"));
  m.def("masked_compaction", &masked_compaction,
        "mask [T, C] -> (slot [T, C], width, compacted, complete): the compact slots of the active neurons",
        py::arg("mask"), py::arg("skip_zero"), py::arg("allow"));
  m.def("scatter_rows_out", &scatter_rows_out, "compact [T, width, R] -> rows [T, C, R], zeros for pruned",
        py::arg("compact"), py::arg("slot"), py::arg("rows"));
  m.def("compact_weight_rows", &compact_weight_rows,
        "weight [T, C, ...] -> [T, width, ...]: rows of kept channels in their slots, storage order kept",
        py::arg("weight"), py::arg("slot"), py::arg("width"));
  m.def("expand_weight_grad", &expand_weight_grad,
        "compact channels-last weight gradient [T, width, ...] -> [T, C, ...], zeros for pruned channels",
        py::arg("grad"), py::arg("slot"), py::arg("poison"));
  m.def("masked_conv2d_forward", &masked_conv2d_forward,
        "masked conv2d forward (compaction, oneDNN on the active neurons, fused epilogue): (out, pre), contiguous "
        "or in grouped NHWC",
        py::arg("input"), py::arg("weight"), py::arg("mask"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("skip_zero"), py::arg("contiguous"), py::arg("poison"));
}

}  // namespace neuronml_fast::cpu::bindings
