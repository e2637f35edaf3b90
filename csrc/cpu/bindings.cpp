// Python bindings of the C++ CPU kernels: tensor checks (TORCH_CHECK, never a crash), dtype
// dispatch, raw pointers into the framework-free kernels. The `*_out` functions and the masked
// epilogue / prologue write into outputs the caller allocated (Python, neuronml_fast/_alloc.py),
// so tests can hand in NaN-poisoned buffers. The rest allocate what they return:
// `masked_conv2d_forward` and `expand_weight_grad` from the buffer pool, NaN-filled if `poison`;
// `compact_weight_rows` and `masked_compaction` with at::empty (every element written);
// `pooled_empty` (uninitialized).
#include <torch/extension.h>

#include <limits>

#include "common/conv_size.h"
#include "cpu/batch_norm.h"
#include "cpu/buffer_pool.h"
#include "cpu/conv_grad.h"
#include "cpu/isa.h"
#include "cpu/layout.h"
#include "cpu/masked.h"
#include "cpu/plastic.h"
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

void check_cpu_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_slots(const at::Tensor& slot, int64_t T, int64_t C, int64_t slots) {
  TORCH_CHECK(slot.device().is_cpu() && slot.scalar_type() == at::kLong && slot.is_contiguous(),
              "slot: expected a contiguous CPU int64 tensor");
  TORCH_CHECK(slot.sizes() == at::IntArrayRef({T, C}), "slot: expected shape [", T, ", ", C, "], got ", slot.sizes());
  const int64_t* s = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot.numel(); ++i)  // a raw loop: two ATen reductions cost more than the kernel
    TORCH_CHECK(s[i] >= -1 && s[i] < slots, "slot: entries must lie in [-1, ", slots, "), got ", s[i]);
}

// Full tensors are [T, N, S, C] views with identical strides and contiguous channels (channels
// last) or contiguous pixels (channels first: a [T, N, C, H, W] contiguous tensor); the compact
// tensor is a [T, N, S, J] view with contiguous slots.
using neuronml_fast::cpu::MaskedLayout;

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes() && t.strides() == ref.strides(), name, ": expected shape ", ref.sizes(),
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
  TORCH_CHECK(compact.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", compact.scalar_type());
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

// ---- batch norm over rows: fused double backward ------------------------------------------

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
    TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == R && t.size(1) == C && t.is_contiguous(), name,
                ": expected a contiguous [", R, ", ", C, "] tensor, got shape ", t.sizes(), " strides ", t.strides());
  };
  auto vector = [&](const at::Tensor& t, const char* name) {
    check_vector(t, name, C, dtype);
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous vector");
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

// ---- masked layers: compaction of the active neurons ----------------------------------------

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
  TORCH_CHECK(full.scalar_type() == compact.scalar_type(), "compact: expected dtype ", full.scalar_type(), ", got ",
              compact.scalar_type());
  TORCH_CHECK(full.dim() == 3 && compact.dim() == 3 && compact.size(0) == full.size(0) &&
                  compact.size(1) == width && compact.size(2) == full.size(2),
              "expected rows [T, C, R] and compact [T, width=", width, ", R]; got ", full.sizes(), " and ",
              compact.sizes());
  check_slots(slot, full.size(0), full.size(1), width);
}

void scatter_rows_out(const at::Tensor& compact, const at::Tensor& slot, at::Tensor& rows) {
  check_row_tensors(rows, compact, slot, compact.size(1));
  TORCH_CHECK(compact.size(2) <= 1 || compact.stride(2) == 1, "compact: expected a contiguous last dimension");
  TORCH_CHECK(rows.is_contiguous(), "rows (out): expected a contiguous tensor");
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "scatter_rows_cpu", [&] {
    neuronml_fast::cpu::scatter_rows<scalar_t>(compact.data_ptr<scalar_t>(), compact.stride(0), compact.stride(1),
                                               rows.size(0), rows.size(1), rows.size(2), slot.data_ptr<int64_t>(),
                                               rows.data_ptr<scalar_t>());
  });
}

// ---- conv weight and input gradients (NHWC, float32, AVX2 register tiles) -----------------

using neuronml_fast::cpu::ConvGradShape;

void check_conv_grad_tensors(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  TORCH_CHECK(neuronml_fast::cpu::conv2d_grad_available(),
              "the AVX2/FMA convolution-gradient kernels are not in use here (see vector_isa())");
  for (auto [t, name] : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, name,
                ": expected a float32 CPU tensor, got ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->is_contiguous(), name, ": expected a contiguous tensor, got strides ", t->strides());
  }
}

// weight [T, A, kH, kW, C] (values or gradient), x_sizes [N, H, W, T*C] (of the input or its
// gradient), gy [N, H_out, W_out, T*A]: the shape of the task-batched convolution, checked.
ConvGradShape conv_grad_shape(const at::Tensor& gy, at::IntArrayRef x_sizes, const at::Tensor& weight,
                              const char* x_name, const char* weight_name, const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  TORCH_CHECK(gy.dim() == 4 && x_sizes.size() == 4 && weight.dim() == 5, "expected grad_out [N, H_out, W_out, T*A], ",
              x_name, " [N, H, W, T*C], ", weight_name, " [T, A, kH, kW, C]; got ", gy.sizes(), ", ", x_sizes, ", ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 &&
                  stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              "stride, padding, dilation: expected pairs with stride >= 1, padding >= 0, dilation >= 1");
  const int64_t T = weight.size(0), A = weight.size(1), KH = weight.size(2), KW = weight.size(3), C = weight.size(4);
  const int64_t N = x_sizes[0], H = x_sizes[1], W = x_sizes[2];
  TORCH_CHECK(C % 16 == 0, weight_name, ": expected C_in divisible by 16, got ", C);
  TORCH_CHECK(x_sizes[3] == T * C, x_name, ": expected ", T * C, " channels (T*C_in), got ", x_sizes[3]);
  const int64_t H_out = neuronml_fast::conv_output_size(H, KH, stride[0], padding[0], dilation[0]);
  const int64_t W_out = neuronml_fast::conv_output_size(W, KW, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(gy.size(0) == N && gy.size(1) == H_out && gy.size(2) == W_out && gy.size(3) == T * A,
              "grad_out: expected [", N, ", ", H_out, ", ", W_out, ", ", T * A, "], got ", gy.sizes());
  return {N, H, W, C, H_out, W_out, A, KH, KW, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
          T * A, T * C};
}

// gy [N, H_out, W_out, T*A], x [N, H, W, T*C] (grouped NHWC storage), grad_weight [T, A, kH, kW, C]:
// contiguous float32. Throws where the AVX2/FMA kernels are not in use (check conv_grad_available).
void conv2d_weight_grad_out(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation) {
  check_conv_grad_tensors({{&gy, "grad_out"}, {&x, "input"}, {&grad_weight, "grad_weight (out)"}});
  const ConvGradShape s =
      conv_grad_shape(gy, x.sizes(), grad_weight, "input", "grad_weight", stride, padding, dilation);
  if (grad_weight.numel() == 0) return;
  neuronml_fast::cpu::conv2d_weight_grad_nhwc(s, grad_weight.size(0), s.A, s.C, gy.data_ptr<float>(),
                                              x.data_ptr<float>(), grad_weight.data_ptr<float>());
}

// gy [N, H_out, W_out, T*A], weight [T, A, kH, kW, C] (contiguous, or one task's contiguous
// weight expanded over the tasks: stride 0), grad_input (overwritten) either [N, H, W, T*C]
// (grouped NHWC storage) or [T, N, C, H, W] (NCHW per task): contiguous float32.
void conv2d_input_grad_out(const at::Tensor& gy, const at::Tensor& weight, at::Tensor& grad_input,
                           std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  const bool shared = weight.dim() == 5 && weight.size(0) > 1 && weight.stride(0) == 0;
  const at::Tensor task_weight = shared ? weight[0] : weight;
  check_conv_grad_tensors({{&gy, "grad_out"}, {&task_weight, "weight"}, {&grad_input, "grad_input (out)"}});
  TORCH_CHECK(grad_input.dim() == 4 || grad_input.dim() == 5,
              "grad_input (out): expected [N, H, W, T*C_in] or [T, N, C_in, H, W], got ", grad_input.sizes());
  const bool channels_first = grad_input.dim() == 5;
  TORCH_CHECK(!channels_first || grad_input.size(0) == weight.size(0), "grad_input (out): expected ",
              weight.size(0), " tasks, got ", grad_input.size(0));
  // grad_input's shape as grouped-NHWC sizes, for the shape checks.
  const auto& g = grad_input;
  const std::vector<int64_t> nhwc = channels_first
                                        ? std::vector<int64_t>{g.size(1), g.size(3), g.size(4), g.size(0) * g.size(2)}
                                        : g.sizes().vec();
  const ConvGradShape s = conv_grad_shape(gy, nhwc, weight, "grad_input", "weight", stride, padding, dilation);
  if (grad_input.numel() == 0) return;
  const int64_t T = weight.size(0);
  const neuronml_fast::cpu::InputGradLayout layout =
      channels_first ? neuronml_fast::cpu::InputGradLayout{s.N * s.C * s.H * s.W, s.C * s.H * s.W, s.W, 1, s.H * s.W}
                     : neuronml_fast::cpu::InputGradLayout{s.C, s.H * s.W * T * s.C, s.W * T * s.C, T * s.C, 1};
  neuronml_fast::cpu::conv2d_input_grad(s, T, s.A, shared ? 0 : s.A * s.KH * s.KW * s.C, layout, gy.data_ptr<float>(),
                                        task_weight.data_ptr<float>(), grad_input.data_ptr<float>());
}

// ---- layouts -------------------------------------------------------------------------------

// src [T, N, C, H, W] contiguous -> dst [N, H, W, T, C] contiguous (grouped NHWC storage).
void to_grouped_nhwc_out(const at::Tensor& src, at::Tensor& dst) {
  check_cpu_float(src, "input");
  TORCH_CHECK(src.dim() == 5 && src.is_contiguous(), "input: expected a contiguous [T, N, C, H, W] tensor, got shape ",
              src.sizes(), " and strides ", src.strides());
  const int64_t T = src.size(0), N = src.size(1), C = src.size(2), H = src.size(3), W = src.size(4);
  TORCH_CHECK(dst.device().is_cpu() && dst.scalar_type() == src.scalar_type(), "out: expected a CPU ",
              src.scalar_type(), " tensor, got ", dst.scalar_type(), " on ", dst.device());
  TORCH_CHECK(dst.sizes() == at::IntArrayRef({N, H, W, T, C}) && dst.is_contiguous(),
              "out: expected a contiguous [N, H, W, T, C] = [", N, ", ", H, ", ", W, ", ", T, ", ", C,
              "] tensor, got shape ", dst.sizes(), " and strides ", dst.strides());
  if (src.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "to_grouped_nhwc_cpu", [&] {
    neuronml_fast::cpu::to_grouped_nhwc<scalar_t>(src.data_ptr<scalar_t>(), T, N, C, H * W,
                                                  dst.data_ptr<scalar_t>());
  });
}

// ---- Hebbian plasticity --------------------------------------------------------------------

using neuronml_fast::cpu::PlasticRule;
using neuronml_fast::cpu::PlasticShape;

const at::Tensor* opt(const c10::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

template <typename scalar_t>
const scalar_t* ptr(const at::Tensor* t) { return t ? t->data_ptr<scalar_t>() : nullptr; }

template <typename scalar_t>
scalar_t* mut(const at::Tensor* t) { return t ? t->data_ptr<scalar_t>() : nullptr; }

void check_plastic(const at::Tensor* t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  if (t == nullptr) return;
  check_cpu_tensor(*t, name, shape, dtype);
}

PlasticShape plastic_shape(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, bool recurrent,
                           int64_t rule, const at::Tensor* modulation, bool tanh, c10::optional<double> clip,
                           int64_t checkpoint_every, bool endogenous) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2, "input, weight: expected [T, B, in] and [out, in], got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(rule >= 0 && rule <= 2, "rule: expected 0 (hebb), 1 (oja) or 2 (modulated), got ", rule);
  PlasticShape s{};
  s.T = x.size(0), s.B = x.size(1), s.OUT = weight.size(0), s.IN = weight.size(1);
  s.recurrent = recurrent;
  TORCH_CHECK(!recurrent || s.OUT == s.IN, "weight: a recurrent layer needs a square weight, got ", weight.sizes());
  TORCH_CHECK(x.size(2) == (recurrent ? s.OUT : s.IN), "input: expected ", recurrent ? s.OUT : s.IN,
              " features, got ", x.size(2));
  s.rule = static_cast<PlasticRule>(rule);
  s.endogenous = endogenous;
  TORCH_CHECK(!endogenous || recurrent, "mod_weight: endogenous modulation needs a recurrent layer");
  TORCH_CHECK((s.rule == PlasticRule::kModulated) == (modulation != nullptr || endogenous),
              "modulation: expected exactly when the rule is modulated");
  s.modulation_per_neuron = modulation != nullptr && modulation->dim() == 3;
  s.tanh = tanh;
  s.alpha_scalar = alpha.dim() == 0;
  s.has_clip = clip.has_value();
  s.clip = clip.value_or(0.0);
  s.recompute = s.has_clip || !tanh;
  s.checkpoint_every = std::max<int64_t>(checkpoint_every, 1);
  const auto dtype = x.scalar_type();
  check_cpu_tensor(x, "input", x.sizes(), dtype);
  check_cpu_tensor(weight, "weight", weight.sizes(), dtype);
  check_cpu_tensor(alpha, "alpha", s.alpha_scalar ? at::IntArrayRef{} : weight.sizes(), dtype);
  if (modulation) {
    check_cpu_tensor(*modulation, "modulation",
               s.modulation_per_neuron ? at::IntArrayRef{s.T, s.B, s.OUT} : at::IntArrayRef{s.T, s.B}, dtype);
  }
  return s;
}

// The modulator's tensors: all of mod_weight [OUT], mod_fanout [OUT] and activity [T, B] (and
// grad_s [T, B] in the backward), or none.
template <typename scalar_t>
neuronml_fast::cpu::Modulator<scalar_t> modulator_of(const PlasticShape& s, const at::Tensor* mod_weight,
                                                     double mod_bias, const at::Tensor* mod_fanout, bool mod_tanh,
                                                     const at::Tensor* activity, const at::Tensor* grad_s) {
  neuronml_fast::cpu::Modulator<scalar_t> m;
  if (!s.endogenous) return m;
  m.weight = ptr<scalar_t>(mod_weight);
  m.bias = static_cast<scalar_t>(mod_bias);
  m.fanout = ptr<scalar_t>(mod_fanout);
  m.tanh = mod_tanh;
  m.activity = mut<scalar_t>(activity);
  m.grad_s = mut<scalar_t>(grad_s);
  return m;
}

void check_modulator(const PlasticShape& s, const at::Tensor* mod_weight, const at::Tensor* mod_fanout,
                     const at::Tensor* activity, at::ScalarType dtype) {
  if (!s.endogenous) return;
  TORCH_CHECK(mod_fanout && activity, "mod_fanout, activity: required with mod_weight");
  check_cpu_tensor(*mod_weight, "mod_weight", {s.OUT}, dtype);
  check_cpu_tensor(*mod_fanout, "mod_fanout", {s.OUT}, dtype);
  check_cpu_tensor(*activity, "activity", {s.T, s.B}, dtype);
}

void plastic_forward_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, double eta,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& drive,
                         const c10::optional<at::Tensor>& y0, const c10::optional<at::Tensor>& modulation,
                         c10::optional<double> clip, bool recurrent, int64_t rule, bool tanh,
                         int64_t checkpoint_every, at::Tensor& hebb, at::Tensor& output,
                         const c10::optional<at::Tensor>& checkpoints, const c10::optional<at::Tensor>& mod_weight,
                         double mod_bias, const c10::optional<at::Tensor>& mod_fanout, bool mod_tanh,
                         const c10::optional<at::Tensor>& activity) {
  const PlasticShape s = plastic_shape(x, weight, alpha, recurrent, rule, opt(modulation), tanh, clip,
                                       checkpoint_every, mod_weight.has_value());
  const auto dtype = x.scalar_type();
  check_modulator(s, opt(mod_weight), opt(mod_fanout), opt(activity), dtype);
  check_plastic(opt(bias), "bias", {s.OUT}, dtype);
  check_plastic(opt(drive), "drive", {s.T, s.B, s.OUT}, dtype);
  check_plastic(opt(y0), "y0", {s.B, s.OUT}, dtype);
  check_cpu_tensor(hebb, "hebb", {s.B, s.OUT, s.IN}, dtype);
  check_cpu_tensor(output, "output", {s.T, s.B, s.OUT}, dtype);
  TORCH_CHECK(checkpoints.has_value(), "checkpoints: required");
  check_cpu_tensor(*checkpoints, "checkpoints", {(s.T + s.checkpoint_every - 1) / s.checkpoint_every, s.B, s.OUT, s.IN},
             dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "plastic_forward", [&] {
    neuronml_fast::cpu::plastic_forward<scalar_t>(
        s, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        static_cast<scalar_t>(eta), ptr<scalar_t>(opt(bias)), ptr<scalar_t>(opt(drive)), ptr<scalar_t>(opt(y0)),
        ptr<scalar_t>(opt(modulation)),
        modulator_of<scalar_t>(s, opt(mod_weight), mod_bias, opt(mod_fanout), mod_tanh, opt(activity), nullptr),
        hebb.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), mut<scalar_t>(opt(checkpoints)));
  });
}

void plastic_backward_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, double eta,
                          const c10::optional<at::Tensor>& y0, const c10::optional<at::Tensor>& modulation,
                          c10::optional<double> clip, bool recurrent, int64_t rule, bool tanh,
                          int64_t checkpoint_every, const at::Tensor& output, const at::Tensor& grad_output,
                          const c10::optional<at::Tensor>& checkpoints, at::Tensor& hebb, at::Tensor& grad_hebb,
                          at::Tensor& grad_z, const c10::optional<at::Tensor>& grad_pre,
                          const c10::optional<at::Tensor>& grad_y0, at::Tensor& grad_alpha, at::Tensor& grad_eta,
                          const c10::optional<at::Tensor>& grad_modulation,
                          const c10::optional<at::Tensor>& segment, const c10::optional<at::Tensor>& mod_weight,
                          const c10::optional<at::Tensor>& mod_fanout, bool mod_tanh,
                          const c10::optional<at::Tensor>& activity, const c10::optional<at::Tensor>& grad_s) {
  const PlasticShape s = plastic_shape(x, weight, alpha, recurrent, rule, opt(modulation), tanh, clip,
                                       checkpoint_every, mod_weight.has_value());
  const auto dtype = x.scalar_type();
  check_modulator(s, opt(mod_weight), opt(mod_fanout), opt(activity), dtype);
  if (s.endogenous) {
    TORCH_CHECK(modulation && modulation->dim() == 3, "modulation: the per-neuron M_t of the modulator's forward");
    TORCH_CHECK(grad_s.has_value(), "grad_s: required with mod_weight");
    check_cpu_tensor(*grad_s, "grad_s", {s.T, s.B}, dtype);
  }
  check_plastic(opt(y0), "y0", {s.B, s.OUT}, dtype);
  check_cpu_tensor(output, "output", {s.T, s.B, s.OUT}, dtype);
  check_cpu_tensor(grad_output, "grad_output", {s.T, s.B, s.OUT}, dtype);
  check_cpu_tensor(hebb, "hebb", {s.B, s.OUT, s.IN}, dtype);
  check_cpu_tensor(grad_hebb, "grad_hebb", {s.B, s.OUT, s.IN}, dtype);
  check_cpu_tensor(grad_z, "grad_z", {s.T, s.B, s.OUT}, dtype);
  TORCH_CHECK(recurrent || grad_pre.has_value(), "grad_pre: required for a plastic_linear backward");
  check_plastic(opt(grad_pre), "grad_pre", {s.T, s.B, s.IN}, dtype);
  check_plastic(opt(grad_y0), "grad_y0", {s.B, s.OUT}, dtype);
  check_cpu_tensor(grad_alpha, "grad_alpha", s.alpha_scalar ? at::IntArrayRef{1} : weight.sizes(), dtype);
  check_cpu_tensor(grad_eta, "grad_eta", {1}, dtype);
  if (grad_modulation) check_cpu_tensor(*grad_modulation, "grad_modulation", modulation->sizes(), dtype);
  TORCH_CHECK(checkpoints.has_value(), "checkpoints: required");
  check_cpu_tensor(*checkpoints, "checkpoints", {(s.T + s.checkpoint_every - 1) / s.checkpoint_every, s.B, s.OUT, s.IN},
             dtype);
  TORCH_CHECK(s.recompute == segment.has_value(),
              "segment: expected exactly when segments are recomputed (clip or identity activation)");
  if (segment) check_cpu_tensor(*segment, "segment", {s.checkpoint_every, s.B, s.OUT, s.IN}, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "plastic_backward", [&] {
    neuronml_fast::cpu::plastic_backward<scalar_t>(
        s, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        static_cast<scalar_t>(eta), ptr<scalar_t>(opt(y0)), ptr<scalar_t>(opt(modulation)),
        modulator_of<scalar_t>(s, opt(mod_weight), 0.0, opt(mod_fanout), mod_tanh, opt(activity), opt(grad_s)),
        output.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), ptr<scalar_t>(opt(checkpoints)),
        hebb.data_ptr<scalar_t>(), grad_hebb.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(),
        mut<scalar_t>(opt(grad_pre)), mut<scalar_t>(opt(grad_y0)), grad_alpha.data_ptr<scalar_t>(),
        grad_eta.data_ptr<scalar_t>(), mut<scalar_t>(opt(grad_modulation)), mut<scalar_t>(opt(segment)));
  });
}

// ---- buffer pool: large outputs keep their pages between calls -----------------------------

namespace pool = neuronml_fast::cpu::buffer_pool;

void release_pooled(void* context) { pool::release(context); }

struct PooledAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const pool::Block block = pool::acquire(nbytes);
    return {block.data, block.context, &release_pooled, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Never destroyed: storages keep a pointer to their allocator for resizing.
PooledAllocator* pooled_allocator() {
  static PooledAllocator* instance = new PooledAllocator();
  return instance;
}

// torch.empty(size, dtype=dtype) on the CPU, with its storage from the buffer pool.
at::Tensor pooled_empty(at::IntArrayRef size, at::ScalarType dtype) {
  for (int64_t s : size) TORCH_CHECK(s >= 0, "size: expected non-negative sizes, got ", size);
  return at::detail::empty_generic(size, pooled_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

py::dict pool_stats() {
  const pool::Stats s = pool::stats();
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["cached_bytes"] = s.cached_bytes;
  d["cached_blocks"] = s.cached_blocks;
  d["limit_bytes"] = s.limit_bytes;
  return d;
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
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected pairs");
  const int64_t T = x.size(0), N = x.size(1), C_in = x.size(2), C = weight.size(1);
  const int64_t H_out = (x.size(3) + 2 * padding[0] - dilation[0] * (weight.size(3) - 1) - 1) / stride[0] + 1;
  const int64_t W_out = (x.size(4) + 2 * padding[1] - dilation[1] * (weight.size(4) - 1) - 1) / stride[1] + 1;
  const auto dtype = x.scalar_type();
  TORCH_CHECK(weight.scalar_type() == dtype, "weight: expected dtype ", dtype, ", got ", weight.scalar_type());
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

// ---- vector kernels chosen at run time (csrc/cpu/isa.h) ------------------------------------

std::string vector_isa() {
  return neuronml_fast::cpu::vector_isa() == neuronml_fast::cpu::VectorIsa::kAvx2 ? "avx2" : "baseline";
}

void set_vector_isa(const std::string& name) {
  using neuronml_fast::cpu::VectorIsa;
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "baseline",
              "isa: expected 'auto', 'avx2' or 'baseline', got '", name, "'");
  const VectorIsa isa = name == "auto"   ? neuronml_fast::cpu::default_vector_isa()
                        : name == "avx2" ? VectorIsa::kAvx2
                                         : VectorIsa::kBaseline;
  TORCH_CHECK(neuronml_fast::cpu::set_vector_isa(isa), "isa 'avx2': this CPU lacks AVX2 or FMA");
}

// Whether the whole extension was compiled with AVX enabled (NEURONML_FAST_MARCH=native on such a
// CPU): then it runs only on CPUs like the build machine, whatever vector_isa() says.
#if defined(__AVX__)
constexpr bool kCompiledWithAvx = true;
#else
constexpr bool kCompiledWithAvx = false;
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neuronml_fast C++ CPU kernels";
  m.def("pooled_empty", &pooled_empty, "torch.empty on the CPU from the buffer pool (csrc/cpu/buffer_pool.h)",
        py::arg("size"), py::arg("dtype"));
  m.attr("pool_min_bytes") = py::int_(pool::kMinPooledBytes);  // smaller requests bypass the pool
  m.def("pool_stats", &pool_stats, "hits, misses, cached bytes and blocks, limit of the CPU buffer pool");
  m.def("pool_empty_cache", &pool::empty_cache, "free every cached block of the CPU buffer pool");
  m.def("pool_set_limit", &pool::set_limit, "most bytes the CPU buffer pool holds for reuse (0: off)",
        py::arg("bytes"));
  m.def("neuron_sensitivity_out", &neuron_sensitivity_out, "Per-neuron Taylor sensitivity (SPEC 3)",
        py::arg("weight"), py::arg("grad_weight"), py::arg("bias"), py::arg("grad_bias"), py::arg("sensitivity"),
        py::arg("taylor"));
  m.attr("PLASTIC_RULE_CODES") = py::dict(py::arg("hebb") = static_cast<int>(PlasticRule::kHebb),
                                          py::arg("oja") = static_cast<int>(PlasticRule::kOja),
                                          py::arg("modulated") = static_cast<int>(PlasticRule::kModulated));
  m.def("plastic_forward_out", &plastic_forward_out, "fused plastic layer forward (SPEC 4)");
  m.def("plastic_backward_out", &plastic_backward_out, "plastic layer backward with trace reconstruction (SPEC 4)");
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
  m.def("conv2d_weight_grad_out", &conv2d_weight_grad_out, "NHWC conv weight gradient, AVX2 register tiles",
        py::arg("grad_out"), py::arg("input"), py::arg("grad_weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("conv2d_input_grad_out", &conv2d_input_grad_out,
        "conv input gradient (grouped NHWC [N, H, W, T*C] or NCHW [T, N, C, H, W]), AVX2 register tiles",
        py::arg("grad_out"), py::arg("weight"), py::arg("grad_input"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("conv_grad_available", &neuronml_fast::cpu::conv2d_grad_available,
        "whether conv2d_weight_grad_out / conv2d_input_grad_out run (their AVX2/FMA kernels are in use)");
  m.def("vector_isa", &vector_isa,
        "the vector kernels in use: 'avx2' (AVX2 and FMA) or 'baseline' (portable loops; "
        "NEURONML_FAST_CPU_ISA=baseline forces them)");
  m.def("set_vector_isa", &set_vector_isa,
        "choose the vector kernels for the rest of the process: 'auto' (the default: this CPU's best unless "
        "NEURONML_FAST_CPU_ISA=baseline), 'avx2' or 'baseline'",
        py::arg("isa"));
  m.attr("compiled_with_avx") = py::bool_(kCompiledWithAvx);
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
  m.def("to_grouped_nhwc_out", &to_grouped_nhwc_out,
        "[T, N, C, H, W] contiguous -> [N, H, W, T, C] (grouped NHWC storage), 8 x 8 register transposes",
        py::arg("input"), py::arg("out"));
  m.def("batch_norm_rows_double_backward_out", &batch_norm_rows_double_backward_out,
        "fused double backward of batch norm over the rows of a [R, C] matrix", py::arg("u"), py::arg("u_gamma"),
        py::arg("u_beta"), py::arg("grad_out"), py::arg("input"), py::arg("weight"), py::arg("mean"),
        py::arg("invstd"), py::arg("grad_g"), py::arg("grad_x"), py::arg("grad_weight"));
}
