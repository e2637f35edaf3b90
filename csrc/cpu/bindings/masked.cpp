// Bindings of the masked layers (csrc/cpu/masked.h): the compaction of the active neurons, the
// fused epilogue / prologue around the ATen dense core, and the masked conv2d launchers.
#include "cpu/bindings/bindings.h"

#include <c10/util/strides.h>

#include <array>
#include <limits>
#include <tuple>
#include <utility>

#include "common/conv_size.h"
#include "cpu/bindings/conv_choice.h"
#include "cpu/conv_grad.h"
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

// ---- masked conv2d: the launchers in C++ ------------------------------------------------
// They run once per layer and step, where Python glue (compaction, pooled outputs, compact
// weights, the grouped views around the dense core, the fused epilogue / prologue) cost a tenth of
// a small layer. Outputs come from the buffer pool, NaN-filled if `poison`.
//
// Activations are [T, N, C, H, W] tensors stored as [N, H, W, T, C] ("grouped NHWC"): for one
// task plain channels_last, for T tasks exactly the input layout of the grouped convolution whose
// groups are the tasks. Why this layout and when outputs are contiguous instead:
// neuronml_fast/ops/masked/cpu.py.

// A pooled buffer of `sizes`, NaN-filled if `poison`.
at::Tensor pooled_output(at::IntArrayRef sizes, at::ScalarType dtype, bool poison) {
  at::Tensor out = pooled_empty(sizes, dtype);
  if (poison) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// [T, N, C, H, W] stored as [N, H, W, T, C] (grouped NHWC), pooled.
at::Tensor grouped_nhwc_empty(int64_t T, int64_t N, int64_t C, int64_t H, int64_t W, at::ScalarType dtype,
                              bool poison) {
  return pooled_output({N, H, W, T, C}, dtype, poison).permute({3, 0, 4, 1, 2});
}

// A [T, N, C, H, W] activation or activation gradient: contiguous, or in grouped NHWC.
at::Tensor activation_empty(int64_t T, int64_t N, int64_t C, int64_t H, int64_t W, at::ScalarType dtype,
                            bool contiguous, bool poison) {
  if (!contiguous) return grouped_nhwc_empty(T, N, C, H, W, dtype, poison);
  return pooled_output({T, N, C, H, W}, dtype, poison);
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
  at::Tensor full = pooled_output({T, C, KH, KW, C_in}, grad.scalar_type(), poison);
  const int64_t row = KH * KW * C_in;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "expand_weight_grad", [&] {
    neuronml_fast::cpu::scatter_rows<scalar_t>(grad.data_ptr<scalar_t>(), grad.size(1) * row, row, T, C, row,
                                               slot.data_ptr<int64_t>(), full.data_ptr<scalar_t>());
  });
  return full.permute({0, 1, 4, 2, 3});
}

// [T, N, C, H, W] in grouped NHWC storage: `t` itself when it is, else one pooled copy (the
// register-transpose kernel of csrc/cpu/layout.h for a contiguous tensor).
at::Tensor to_grouped_nhwc(const at::Tensor& t) {
  const at::Tensor storage = t.permute({1, 3, 4, 0, 2});
  if (storage.is_contiguous()) return t;
  at::Tensor copy = pooled_empty(storage.sizes(), t.scalar_type());
  if (t.is_contiguous()) {
    to_grouped_nhwc_out(t, copy);
  } else {
    copy.copy_(storage);
  }
  return copy.permute({3, 0, 4, 1, 2});
}

// [T, N, C_in, H, W] -> [N, T*C_in, H, W] channels-last: the tasks become conv groups.
at::Tensor grouped_input(const at::Tensor& x) {
  const int64_t N = x.size(1), H = x.size(3), W = x.size(4);
  return to_grouped_nhwc(x).permute({1, 3, 4, 0, 2}).reshape({N, H, W, x.size(0) * x.size(2)}).permute({0, 3, 1, 2});
}

// [T, A, C_in/g, kH, kW] -> [T*A, C_in/g, kH, kW] channels-last: a view of channels-last weights,
// else one copy (an expanded weight, MAML's meta-parameters for every task, included).
at::Tensor grouped_weight(const at::Tensor& w) {
  return w.permute({0, 1, 3, 4, 2})
      .reshape({w.size(0) * w.size(1), w.size(3), w.size(4), w.size(2)})
      .contiguous()
      .permute({0, 3, 1, 2});
}

// [T, C, C_in, kH, kW] with oneDNN's channels-last weight strides ([T*C, kH, kW, C_in] storage):
// the layout weight gradients come out in and stay in (see channels_last_weight in cpu.py).
at::Tensor channels_last_weight(const at::Tensor& w) { return grouped_weight(w).view(w.sizes()); }

// A [T, N, C, H, W] view (grouped NHWC or contiguous) -> the [T, N, H*W, C] view the epilogue and
// prologue take.
at::Tensor pixel_rows(const at::Tensor& t) { return t.permute({0, 1, 3, 4, 2}).flatten(2, 3); }

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

// Checks the launchers' shared arguments; returns the output's (H_out, W_out).
std::pair<int64_t, int64_t> check_conv_args(const at::Tensor& x, const at::Tensor& weight, const ConvParams& conv) {
  check_cpu_float(x, "input");
  TORCH_CHECK(x.dim() == 5 && weight.dim() == 5 && weight.size(0) == x.size(0),
              "expected input [T, N, C_in, H, W] and weight [T, C_out, C_in/groups, kH, kW], got ", x.sizes(), " and ",
              weight.sizes());
  checks::check_dtype(weight, "weight", x.scalar_type());
  checks::check_pairs(conv.stride, conv.padding, conv.dilation);
  const auto size = [&](int d) {
    return neuronml_fast::conv_output_size(x.size(3 + d), weight.size(3 + d), conv.stride[d], conv.padding[d],
                                           conv.dilation[d]);
  };
  return {size(0), size(1)};
}

// The case a measured choice (conv_choice.h) is remembered for: which pass, the shapes with the
// active count in buckets, dtype, threads, the convolution's parameters, whether one weight serves
// every task, and the pass's flags.
ChoiceKey choice_key(int64_t pass, const at::Tensor& x, const at::Tensor& weight, int64_t active,
                     const ConvParams& conv, std::initializer_list<bool> flags) {
  ChoiceKey key{pass, x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), weight.size(1),
                active_bucket(active, weight.size(1)), weight.size(3), weight.size(4), conv.groups,
                static_cast<int64_t>(x.scalar_type()), at::get_num_threads(),
                weight.size(0) > 1 && weight.stride(0) == 0};
  for (const auto* v : {&conv.stride, &conv.padding, &conv.dilation}) key.insert(key.end(), v->begin(), v->end());
  for (bool f : flags) key.push_back(f);
  return key;
}

// The grouped convolution (tasks x groups groups) by oneDNN: one grouped call, or one call per
// task on its channel slice of the grouped storage, written into one pooled channels-last buffer.
// x [N, T*C_in, H, W], w [T*A, C_in/g, kH, kW], channels-last -> [N, T*A, H_out, W_out].
at::Tensor onednn_conv_forward(const at::Tensor& x, const at::Tensor& w, int64_t tasks, const ConvParams& conv,
                               ConvImpl impl, bool poison) {
  if (impl != ConvImpl::kOneDnnPerTask || tasks == 1)
    return at::convolution(x, w, c10::nullopt, conv.stride, conv.padding, conv.dilation, false, {0, 0},
                           conv.groups * tasks);
  const int64_t c_in = x.size(1) / tasks, a = w.size(0) / tasks;
  at::Tensor out;
  for (int64_t t = 0; t < tasks; ++t) {
    const at::Tensor y = at::convolution(x.narrow(1, t * c_in, c_in), w.narrow(0, t * a, a), c10::nullopt,
                                         conv.stride, conv.padding, conv.dilation, false, {0, 0}, conv.groups);
    if (!out.defined())
      out = pooled_output({y.size(0), y.size(2), y.size(3), tasks * a}, y.scalar_type(), poison).permute({0, 3, 1, 2});
    out.narrow(1, t * a, a).copy_(y);
  }
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
  const ConvParams conv{stride, padding, dilation, groups};
  const auto [H_out, W_out] = check_conv_args(x, weight, conv);
  const int64_t T = x.size(0), N = x.size(1), C = weight.size(1);
  const auto dtype = x.scalar_type();
  const at::Tensor m = mask.contiguous();
  check_cpu_tensor(m, "mask", {T, C}, dtype);
  const c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  if (b) check_cpu_tensor(*b, "bias", {T, C}, dtype);
  at::Tensor out = activation_empty(T, N, C, H_out, W_out, dtype, contiguous, poison);
  at::Tensor pre = activation_empty(T, N, C, H_out, W_out, dtype, contiguous, poison);
  if (out.numel() == 0) return {out, pre};
  at::Tensor slot;
  const neuronml_fast::cpu::CompactionPlan plan = compaction_plan(m, skip_zero, groups == 1, slot);
  const int64_t A = plan.width, S = H_out * W_out;
  at::Tensor y;  // [T, N, S, A] view, slots contiguous
  if (A == 0) {
    y = at::zeros({T, N, S, 0}, x.options());
  } else {
    const at::Tensor w = plan.compacted ? compact_weight_rows(weight, slot, A) : weight;
    const at::Tensor gx = grouped_input(x), gw = grouped_weight(w);
    at::Tensor conv_out;
    const auto run = [&](ConvImpl impl) { conv_out = onednn_conv_forward(gx, gw, T, conv, impl, poison); };
    std::vector<Candidate> candidates{{ConvImpl::kOneDnnGrouped, [&] { run(ConvImpl::kOneDnnGrouped); }}};
    if (T > 1) candidates.emplace_back(ConvImpl::kOneDnnPerTask, [&] { run(ConvImpl::kOneDnnPerTask); });
    run(choose_conv_impl(choice_key(0, x, weight, A, conv, {}), candidates));
    y = conv_out.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).view({N, S, T, A}).permute(
        {2, 0, 1, 3});
  }
  at::Tensor out_rows = pixel_rows(out), pre_rows = pixel_rows(pre);
  masked_forward_epilogue_out(y, slot, m, b, out_rows, pre_rows);
  return {out, pre};
}

// Whether csrc/cpu/conv_grad.cpp can compute the input and weight gradients (float32, C_in a
// multiple of 16, no groups, AVX2/FMA here): a candidate of the measured choice, not a rule.
bool own_conv_grads_available(at::ScalarType dtype, int64_t in_channels, int64_t groups) {
  return groups == 1 && dtype == at::kFloat && in_channels % 16 == 0 && neuronml_fast::cpu::conv2d_grad_available();
}

// Input and weight gradients of the grouped convolution (tasks x groups groups) by oneDNN: one
// grouped call (`kOneDnnGrouped`, ~0.3 ms per call saved for small tasks), or one call per task on
// its channel slice of the grouped storage (`kOneDnnPerTask`: oneDNN's grouped backward is slow
// for many large groups), the input gradients landing in one grouped-NHWC buffer.
// gy [N, T*A, H_out, W_out], x [N, T*C_in, H, W], w [T*A, C_in/g, kH, kW], channels-last. Returns
// (grad_input [N, T*C_in, H, W] channels-last, grad_weight [T*A, ...]), undefined where not needed.
std::pair<at::Tensor, at::Tensor> onednn_conv_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                                                       int64_t tasks, const ConvParams& conv, bool need_input_grad,
                                                       bool need_weight_grad, ConvImpl impl, bool poison) {
  const std::array<bool, 3> need{need_input_grad, need_weight_grad, false};
  if (tasks == 1 || impl != ConvImpl::kOneDnnPerTask) {
    auto [gx, gw, gb] = at::convolution_backward(gy, x, w, c10::nullopt, conv.stride, conv.padding, conv.dilation,
                                                 false, {0, 0}, conv.groups * tasks, need);
    return {need_input_grad ? gx.contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor(), gw};
  }
  const int64_t c_in = x.size(1) / tasks, a = w.size(0) / tasks;
  at::Tensor grad_input;
  if (need_input_grad)
    grad_input = pooled_output({x.size(0), x.size(2), x.size(3), x.size(1)}, x.scalar_type(), poison)
                     .permute({0, 3, 1, 2});
  std::vector<at::Tensor> weight_grads;
  for (int64_t t = 0; t < tasks; ++t) {
    auto [gx, gw, gb] = at::convolution_backward(gy.narrow(1, t * a, a), x.narrow(1, t * c_in, c_in),
                                                 w.narrow(0, t * a, a), c10::nullopt, conv.stride, conv.padding,
                                                 conv.dilation, false, {0, 0}, conv.groups, need);
    if (need_input_grad) grad_input.narrow(1, t * c_in, c_in).copy_(gx);
    if (need_weight_grad) weight_grads.push_back(gw);
  }
  return {grad_input, need_weight_grad ? at::cat(weight_grads) : at::Tensor()};
}

// Input gradient [T, N, C_in, H, W] (contiguous, or grouped NHWC) by csrc/cpu/conv_grad.cpp from the
// compact output gradient `gy` ([N, H_out, W_out, T*A] storage) and the compact weights w [T, A, C_in, kH, kW].
at::Tensor own_input_grad(const at::Tensor& gy, const at::Tensor& w, at::IntArrayRef x_sizes, const ConvParams& conv,
                          bool contiguous, bool poison) {
  const int64_t T = x_sizes[0], N = x_sizes[1], C = x_sizes[2], H = x_sizes[3], W = x_sizes[4];
  const int64_t A = w.size(1), KH = w.size(3), KW = w.size(4);
  // One weight for every task (MAML's inner step): the kernel reads it once, no per-task copies.
  const at::Tensor w_rows = T > 1 && w.stride(0) == 0
                                ? grouped_weight(w.narrow(0, 0, 1)).permute({0, 2, 3, 1}).expand({T, A, KH, KW, C})
                                : grouped_weight(w).permute({0, 2, 3, 1}).reshape({T, A, KH, KW, C});
  at::Tensor out = contiguous ? pooled_output(x_sizes, gy.scalar_type(), poison)
                              : pooled_output({N, H, W, T * C}, gy.scalar_type(), poison);
  conv2d_input_grad_out(gy, w_rows, out, conv.stride, conv.padding, conv.dilation);
  return contiguous ? out : out.view({N, H, W, T, C}).permute({3, 0, 4, 1, 2});
}

// Weight gradient [T*A, C_in, kH, kW] (channels-last strides) by csrc/cpu/conv_grad.cpp from the
// compact output gradient `gy` ([N, H_out, W_out, T*A] storage) and the input x [T, N, C_in, H, W].
at::Tensor own_weight_grad(const at::Tensor& gy, const at::Tensor& x, int64_t A, int64_t KH, int64_t KW,
                           const ConvParams& conv, bool poison) {
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const at::Tensor x_rows = to_grouped_nhwc(x).permute({1, 3, 4, 0, 2}).reshape({N, H, W, T * C});
  at::Tensor out = pooled_output({T, A, KH, KW, C}, x.scalar_type(), poison);
  conv2d_weight_grad_out(gy, x_rows, out, conv.stride, conv.padding, conv.dilation);
  return out.view({T * A, KH, KW, C}).permute({0, 3, 1, 2});
}

// The [T, N, H*W, C] views of grad_out, grad_pre and pre (the last two may be absent) the prologue
// takes, in one layout: that of `pre` (the layout the forward wrote), else that of grad_out;
// grouped NHWC or contiguous (read channels-first), a tensor in another layout copied into it.
std::array<c10::optional<at::Tensor>, 3> prologue_rows(const at::Tensor& grad_out,
                                                        const c10::optional<at::Tensor>& grad_pre,
                                                        const c10::optional<at::Tensor>& pre) {
  const at::Tensor& lead = pre ? *pre : grad_out;
  const bool grouped = lead.permute({1, 3, 4, 0, 2}).is_contiguous();
  const auto rows = [&](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    if (!t) return c10::nullopt;
    return pixel_rows(grouped ? to_grouped_nhwc(*t) : t->contiguous());
  };
  return {rows(grad_out), rows(grad_pre), rows(pre)};
}

// `t` contiguous with the canonical strides. ATen's contiguous() returns a tensor as it is where
// only the strides of its size-1 dimensions differ (a grouped-NHWC gradient of one input channel
// or 1 x 1 images), and torch's conv2d returns canonical strides: the caller's strides must match.
at::Tensor canonically_contiguous(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const c10::DimVector canonical = c10::contiguous_strides(c.sizes());
  return c.strides() == at::IntArrayRef(canonical) ? c : c.as_strided(c.sizes(), canonical);
}

// The empty tensor that stands for a gradient the caller did not ask for. A new one for each: a
// custom op's outputs may not alias each other.
at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Gradients of masked_conv2d_forward: (grad_input, grad_weight, grad_bias, grad_mask). grad_input is
// contiguous [T, N, C_in, H, W] if `contiguous_input_grad`, else grouped NHWC like the activations;
// grad_weight has channels-last strides. The output gradient is gathered onto the active neurons
// by the fused prologue (which also reduces the bias and mask gradients), and the dense core runs
// on them: csrc/cpu/conv_grad.cpp or oneDNN, whichever conv_choice.h measured faster for the case.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pre, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& mask, const c10::optional<at::Tensor>& pre,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    bool skip_zero, bool need_input_grad, bool need_weight_grad, bool contiguous_input_grad, bool poison) {
  const ConvParams conv{stride, padding, dilation, groups};
  const auto [H_out, W_out] = check_conv_args(x, weight, conv);
  const int64_t T = x.size(0), N = x.size(1), C = weight.size(1);
  const auto dtype = x.scalar_type();
  check_cpu_float(grad_out, "grad_out");
  checks::check_dtype(grad_out, "grad_out", dtype);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({T, N, C, H_out, W_out}), "grad_out: expected the output's shape [",
              T, ", ", N, ", ", C, ", ", H_out, ", ", W_out, "], got ", grad_out.sizes());
  const at::Tensor m = mask.contiguous();
  check_cpu_tensor(m, "mask", {T, C}, dtype);
  at::Tensor slot;
  const neuronml_fast::cpu::CompactionPlan plan = compaction_plan(m, skip_zero, groups == 1, slot);
  const int64_t A = plan.width;
  // The compact output gradient, [N, H_out, W_out, T*A] storage. Slots that hold no channel must be
  // zero for the dense core; the prologue writes the rest.
  at::Tensor gy = plan.complete ? pooled_output({N, H_out, W_out, T * A}, dtype, poison)
                                : pooled_empty({N, H_out, W_out, T * A}, dtype).zero_();
  at::Tensor grad_bias = pooled_output({T, C}, dtype, poison), grad_mask = pooled_output({T, C}, dtype, poison);
  const auto [go_rows, gp_rows, pre_rows] = prologue_rows(grad_out, grad_pre, pre);
  at::Tensor gy_rows = gy.view({N, H_out * W_out, T, A}).permute({2, 0, 1, 3});
  masked_backward_prologue_out(*go_rows, gp_rows, pre_rows, slot, m, gy_rows, grad_bias, grad_mask);

  at::Tensor grad_input = not_requested(x), grad_weight = not_requested(x);
  if (T == 0 || A == 0 || N == 0 || !(need_input_grad || need_weight_grad)) {
    if (need_input_grad) {
      grad_input = activation_empty(x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), dtype,
                                     contiguous_input_grad, false)
                       .zero_();
    }
    if (need_weight_grad) grad_weight = channels_last_weight(at::zeros_like(weight));
    return {grad_input, grad_weight, grad_bias, grad_mask};
  }
  const at::Tensor w = plan.compacted ? compact_weight_rows(weight, slot, A) : weight;
  at::Tensor gx, gw;
  const auto run = [&](ConvImpl impl) {
    if (impl == ConvImpl::kOwn) {
      gx = need_input_grad ? own_input_grad(gy, w, x.sizes(), conv, contiguous_input_grad, poison) : at::Tensor();
      gw = need_weight_grad ? own_weight_grad(gy, x, A, weight.size(3), weight.size(4), conv, poison) : at::Tensor();
      return;
    }
    std::tie(gx, gw) = onednn_conv_backward(gy.permute({0, 3, 1, 2}), grouped_input(x), grouped_weight(w), T, conv,
                                            need_input_grad, need_weight_grad, impl, poison);
    if (!need_input_grad) return;
    gx = gx.permute({0, 2, 3, 1}).view({N, x.size(3), x.size(4), T, x.size(2)}).permute({3, 0, 4, 1, 2});
    if (contiguous_input_grad) gx = canonically_contiguous(gx);
  };
  std::vector<Candidate> candidates{{ConvImpl::kOneDnnGrouped, [&] { run(ConvImpl::kOneDnnGrouped); }}};
  if (T > 1) candidates.emplace_back(ConvImpl::kOneDnnPerTask, [&] { run(ConvImpl::kOneDnnPerTask); });
  if (own_conv_grads_available(dtype, x.size(2), groups))
    candidates.emplace_back(ConvImpl::kOwn, [&] { run(ConvImpl::kOwn); });
  run(choose_conv_impl(choice_key(1, x, weight, A, conv, {need_input_grad, need_weight_grad, contiguous_input_grad}),
                       candidates));
  if (need_input_grad) grad_input = gx;
  if (need_weight_grad) {
    grad_weight = channels_last_weight(gw.view({T, A, weight.size(2), weight.size(3), weight.size(4)}));
    if (plan.compacted) grad_weight = expand_weight_grad(grad_weight, slot, poison);
  }
  return {grad_input, grad_weight, grad_bias, grad_mask};
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
  m.def("masked_conv2d_backward", &masked_conv2d_backward,
        "masked conv2d backward (fused prologue, then csrc/cpu/conv_grad.cpp or oneDNN on the active neurons): "
        "(grad_input, grad_weight, grad_bias, grad_mask)",
        py::arg("grad_out"), py::arg("grad_pre"), py::arg("input"), py::arg("weight"), py::arg("mask"), py::arg("pre"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("skip_zero"),
        py::arg("need_input_grad"), py::arg("need_weight_grad"), py::arg("contiguous_input_grad"), py::arg("poison"));
  m.def("masked_conv2d_own_grads_available", &own_conv_grads_available,
        "whether csrc/cpu/conv_grad.cpp's kernels are a candidate for masked_conv2d_backward's input and weight "
        "gradients, for the input's dtype, in_channels and groups",
        py::arg("dtype"), py::arg("in_channels"), py::arg("groups"));
  m.def("conv_policy", &conv_policy,
        "how the masked conv's dense core is chosen: auto (measured per case at first use), own, onednn, "
        "onednn-grouped, onednn-per-task (NEURONML_FAST_CPU_CONV, or set_conv_policy)");
  m.def("set_conv_policy", &set_conv_policy, "override NEURONML_FAST_CPU_CONV ('' restores it)", py::arg("policy"));
  m.def("conv_choices", [] {
        py::list out;
        for (const auto& [key, impl] : conv_choices()) out.append(py::make_tuple(key, conv_impl_name(impl)));
        return out;
      }, "the remembered measured choices: [(case key, 'own' | 'onednn-grouped' | 'onednn-per-task')]");
  m.def("clear_conv_choices", &clear_conv_choices, "forget the measured choices (they are measured again)");
}

}  // namespace neuronml_fast::cpu::bindings
