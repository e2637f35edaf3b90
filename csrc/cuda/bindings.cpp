// Python bindings of the CUDA kernels: tensor checks (TORCH_CHECK), device guard, current
// stream, raw pointers into the framework-free launchers, and a check of every launch.
// Every kernel binding writes into outputs the caller allocated, so tests can hand in NaN-poisoned
// buffers: the Python launchers (neuronml_fast/ops/<family>/cuda.py and the GPU drivers
// neuronml_fast/ops/<family>/gpu.py) allocate them through neuronml_fast/_alloc.py.
//
// The same file builds the emulated extension (NEURONML_FAST_CUDA_EMULATION, against csrc/emu):
// there CPU tensors stand in for device memory and the kernels run synchronously in the emulator.
#include <torch/extension.h>

#include <limits>

#ifdef NEURONML_FAST_CUDA_EMULATION
#include <map>
#include <tuple>

#include "emu/cuda_emu.h"
#include "emu/selftest.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/conv_size.h"
#include "common/torch_checks.h"
#include "cuda/masked.h"
#include "cuda/plastic.h"
#include "cuda/sensitivity.h"

namespace {

#ifdef NEURONML_FAST_CUDA_EMULATION
constexpr const char* kKernelDevice = "CPU (CUDA emulation)";
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const c10::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kKernelDevice = "CUDA";
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using KernelDeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

namespace checks = neuronml_fast::checks;
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
  TORCH_CHECK(on_kernel_device(t) && t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), ", got ",
              t.device());
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, kernel, " launch failed: ", cudaGetErrorString(status));
}

void check_on_kernel_device(const at::Tensor& t, const char* name) {
  checks::check_device(t, name, on_kernel_device(t), kKernelDevice);
}

// A [n] vector of one dtype on ref's device.
void check_device_vector(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t n,
                         at::ScalarType dtype) {
  check_same_device(t, ref, name);
  checks::check_vector(t, name, n, dtype);
}

void neuron_sensitivity_out(const at::Tensor& weight, const at::Tensor& grad_weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& grad_bias,
                            at::Tensor& sensitivity, at::Tensor& taylor) {
  check_on_kernel_device(weight, "weight");
  const DType dtype = to_kernel_dtype(weight.scalar_type(), "weight");
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-d [rows, cols] view, got ", weight.sizes());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  checks::check_rows(weight, "weight", rows, cols);
  check_same_device(grad_weight, weight, "grad_weight");
  checks::check_dtype(grad_weight, "grad_weight", weight.scalar_type());
  checks::check_rows(grad_weight, "grad_weight", rows, cols);
  TORCH_CHECK(bias.has_value() == grad_bias.has_value(),
              "bias and grad_bias: expected both or neither, got only one");
  if (bias) check_device_vector(*bias, weight, "bias", rows, weight.scalar_type());
  if (grad_bias) check_device_vector(*grad_bias, weight, "grad_bias", rows, weight.scalar_type());
  const at::ScalarType acc = accumulation_dtype(weight.scalar_type());
  check_device_vector(sensitivity, weight, "sensitivity (out)", rows, acc);
  check_device_vector(taylor, weight, "taylor (out)", rows, acc);
  checks::check_contiguous(sensitivity, "sensitivity (out)");
  checks::check_contiguous(taylor, "taylor (out)");

  const KernelDeviceGuard guard(weight.device());
  check_launch(neuronml_fast::cuda::neuron_sensitivity(
                   dtype, weight.data_ptr(), weight.stride(0), grad_weight.data_ptr(), grad_weight.stride(0),
                   bias ? bias->data_ptr() : nullptr, bias ? bias->stride(0) : 0,
                   grad_bias ? grad_bias->data_ptr() : nullptr, grad_bias ? grad_bias->stride(0) : 0, rows, cols,
                   sensitivity.data_ptr(), taylor.data_ptr(), current_stream()),
               "neuron_sensitivity");
}

// ---- masked conv (and linear, as a 1x1 conv) ----------------------------------------------------

using neuronml_fast::cuda::ConvShape;

void check_contiguous_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_same_device(t, ref, name);
  checks::check_dtype(t, name, ref.scalar_type());
  checks::check_contiguous(t, name);
}

// Shape of the problem from x [T, N, CIN, H, W] and weight [T, COUT, CIN_G, KH, KW]; checks the mask
// [T, COUT] (the kernels find the active channels from it).
ConvShape conv_shape(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool skip_zero) {
  check_on_kernel_device(x, "input");
  to_kernel_dtype(x.scalar_type(), "input");
  TORCH_CHECK(x.dim() == 5 && weight.dim() == 5, "input, weight: expected 5-d task-batched tensors, got ", x.sizes(),
              " and ", weight.sizes());
  checks::check_pairs(stride, padding, dilation);
  TORCH_CHECK(groups >= 1 && weight.size(1) % groups == 0 && weight.size(2) * groups == x.size(2),
              "groups: inconsistent with input ", x.sizes(), " and weight ", weight.sizes());
  check_contiguous_like(x, x, "input");
  check_contiguous_like(weight, x, "weight");
  ConvShape s{};
  s.T = x.size(0), s.N = x.size(1), s.CIN = x.size(2), s.H = x.size(3), s.W = x.size(4);
  s.COUT = weight.size(1), s.CIN_G = weight.size(2), s.KH = weight.size(3), s.KW = weight.size(4);
  s.G = groups, s.COUT_G = s.COUT / groups;
  s.stride_h = stride[0], s.stride_w = stride[1], s.pad_h = padding[0], s.pad_w = padding[1];
  s.dil_h = dilation[0], s.dil_w = dilation[1];
  s.skip_zero = skip_zero;
  s.HO = neuronml_fast::conv_output_size(s.H, s.KH, s.stride_h, s.pad_h, s.dil_h);
  s.WO = neuronml_fast::conv_output_size(s.W, s.KW, s.stride_w, s.pad_w, s.dil_w);
  TORCH_CHECK(weight.size(0) == s.T, "weight: expected ", s.T, " tasks, got ", weight.size(0));
  check_contiguous_like(mask, x, "mask");
  checks::check_shape(mask, "mask", {s.T, s.COUT});
  const char* overflow = neuronml_fast::cuda::masked_conv_index_overflow(s);
  TORCH_CHECK(overflow == nullptr, overflow, ": more than ", neuronml_fast::cuda::kMaskedMaxIndex,
              " elements per task, over what the CUDA kernels index in 32 bits; split the batch");
  return s;
}

neuronml_fast::cuda::Fp32Gemm fp32_gemm(bool tf32) {
  return tf32 ? neuronml_fast::cuda::Fp32Gemm::kTf32 : neuronml_fast::cuda::Fp32Gemm::kExact;
}

void masked_conv_forward_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool skip_zero, bool tf32, at::Tensor& out,
                             at::Tensor& pre) {
  const ConvShape s = conv_shape(x, weight, mask, stride, padding, dilation, groups, skip_zero);
  if (bias) {
    check_contiguous_like(*bias, x, "bias");
    checks::check_shape(*bias, "bias", {s.T, s.COUT});
  }
  for (const auto& [t, name] : {std::pair{&out, "out"}, std::pair{&pre, "pre"}}) {
    check_contiguous_like(*t, x, name);
    checks::check_shape(*t, name, {s.T, s.N, s.COUT, s.HO, s.WO});
  }
  const KernelDeviceGuard guard(x.device());
  check_launch(neuronml_fast::cuda::masked_conv_forward(
                   to_kernel_dtype(x.scalar_type(), "input"), fp32_gemm(tf32), s, x.data_ptr(), weight.data_ptr(), mask.data_ptr(),
                   bias ? bias->data_ptr() : nullptr, out.data_ptr(), pre.data_ptr(), current_stream()),
               "masked_conv_forward");
}

void masked_conv_input_grad_out(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pre,
                                const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, bool skip_zero, bool tf32, at::Tensor& grad_input) {
  const ConvShape s = conv_shape(x, weight, mask, stride, padding, dilation, groups, skip_zero);
  check_contiguous_like(grad_out, x, "grad_out");
  checks::check_shape(grad_out, "grad_out", {s.T, s.N, s.COUT, s.HO, s.WO});
  if (grad_pre) {
    check_contiguous_like(*grad_pre, x, "grad_pre");
    checks::check_shape(*grad_pre, "grad_pre", grad_out.sizes());
  }
  check_contiguous_like(grad_input, x, "grad_input");
  checks::check_shape(grad_input, "grad_input", x.sizes());
  const KernelDeviceGuard guard(x.device());
  check_launch(neuronml_fast::cuda::masked_conv_input_grad(
                   to_kernel_dtype(x.scalar_type(), "input"), fp32_gemm(tf32), s, grad_out.data_ptr(),
                   grad_pre ? grad_pre->data_ptr() : nullptr, weight.data_ptr(), mask.data_ptr(),
                   grad_input.data_ptr(), current_stream()),
               "masked_conv_input_grad");
}

void masked_conv_weight_grad_out(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pre,
                                 const c10::optional<at::Tensor>& pre, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, bool skip_zero, bool tf32, int64_t splits,
                                 int64_t pixels_per_split, const c10::optional<at::Tensor>& part,
                                 const c10::optional<at::Tensor>& grad_weight, at::Tensor& grad_bias,
                                 at::Tensor& grad_mask) {
  const ConvShape s = conv_shape(x, weight, mask, stride, padding, dilation, groups, skip_zero);
  TORCH_CHECK(splits >= 1 && pixels_per_split >= 1 && splits * pixels_per_split >= s.N * s.HO * s.WO,
              "splits, pixels_per_split: must cover all ", s.N * s.HO * s.WO, " output pixels");
  check_contiguous_like(grad_out, x, "grad_out");
  checks::check_shape(grad_out, "grad_out", {s.T, s.N, s.COUT, s.HO, s.WO});
  for (const auto& [t, name] : {std::pair{&grad_pre, "grad_pre"}, std::pair{&pre, "pre"}}) {
    if (*t) {
      check_contiguous_like(**t, x, name);
      checks::check_shape(**t, name, grad_out.sizes());
    }
  }
  if (grad_weight) {
    check_contiguous_like(*grad_weight, x, "grad_weight");
    checks::check_shape(*grad_weight, "grad_weight", weight.sizes());
  }
  check_contiguous_like(grad_bias, x, "grad_bias");
  checks::check_shape(grad_bias, "grad_bias", {s.T, s.COUT});
  check_contiguous_like(grad_mask, x, "grad_mask");
  checks::check_shape(grad_mask, "grad_mask", {s.T, s.COUT});
  TORCH_CHECK(part.has_value() == (splits > 1), "part: expected a partial-sum buffer exactly when splits > 1, got ",
              part ? "one" : "none", " for ", splits, " splits");
  if (part) {
    const at::ScalarType acc = accumulation_dtype(x.scalar_type());
    const int64_t row = (grad_weight ? grad_weight->numel() : 0) + 2 * s.T * s.COUT;
    check_same_device(*part, x, "part");
    TORCH_CHECK(part->scalar_type() == acc && part->is_contiguous(), "part: expected a contiguous ", acc, " tensor");
    checks::check_shape(*part, "part", {splits, row});
  }
  const KernelDeviceGuard guard(x.device());
  check_launch(neuronml_fast::cuda::masked_conv_weight_grad(
                   to_kernel_dtype(x.scalar_type(), "input"), fp32_gemm(tf32), s, grad_out.data_ptr(),
                   grad_pre ? grad_pre->data_ptr() : nullptr, pre ? pre->data_ptr() : nullptr, x.data_ptr(),
                   mask.data_ptr(), splits, pixels_per_split, part ? part->data_ptr() : nullptr,
                   grad_weight ? grad_weight->data_ptr() : nullptr, grad_bias.data_ptr(), grad_mask.data_ptr(),
                   current_stream()),
               "masked_conv_weight_grad");
}

// ---- Hebbian plasticity: the whole time loop in three kernels (launchers: neuronml_fast/ops/plastic/gpu.py) ----

using neuronml_fast::PlasticRule;
using neuronml_fast::cuda::PlasticPlan;
using neuronml_fast::cuda::PlasticShape;
using OptionalTensor = c10::optional<at::Tensor>;

// The data of a contiguous tensor like `ref` (dtype, device) of `numel` elements.
void* plastic_tensor(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t numel) {
  check_contiguous_like(t, ref, name);
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got shape ", t.sizes());
  return t.data_ptr();
}

void* plastic_optional(const OptionalTensor& t, const at::Tensor& ref, const char* name, int64_t numel) {
  return t ? plastic_tensor(*t, ref, name, numel) : nullptr;
}

// The data of a contiguous tensor in the accumulation dtype of `ref` (float32 for 16-bit), on its device.
void* plastic_acc(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t numel) {
  check_same_device(t, ref, name);
  checks::check_dtype(t, name, accumulation_dtype(ref.scalar_type()));
  checks::check_contiguous(t, name);
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got shape ", t.sizes());
  return t.data_ptr();
}

void* plastic_acc_optional(const OptionalTensor& t, const at::Tensor& ref, const char* name, int64_t numel) {
  return t ? plastic_acc(*t, ref, name, numel) : nullptr;
}

PlasticShape plastic_shape(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, double clip,
                           int64_t every, bool recurrent, int64_t rule, bool per_neuron, bool endogenous,
                           bool mod_tanh, bool tanh, bool has_clip, bool recompute) {
  check_on_kernel_device(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-d [out, in] tensor, got shape ", weight.sizes());
  to_kernel_dtype(weight.scalar_type(), "weight");
  const int64_t out = weight.size(0), in = weight.size(1);
  // The kernels divide step and row indices in 32 bits (csrc/cuda/plastic.cu).
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(out <= kMax32 && in <= kMax32, "weight: expected at most ", kMax32, " rows and columns, got shape ",
              weight.sizes());
  TORCH_CHECK(x.dim() < 1 || x.size(0) <= kMax32, "input: expected at most ", kMax32, " steps, got shape ", x.sizes());
  check_contiguous_like(weight, weight, "weight");
  TORCH_CHECK(!recurrent || out == in, "weight: a recurrent layer needs a square weight, got shape ", weight.sizes());
  TORCH_CHECK(x.dim() == 3 && x.size(2) == (recurrent ? out : in), "input: expected [T, B, ", recurrent ? out : in,
              "], got shape ", x.sizes());
  check_contiguous_like(x, weight, "input");
  TORCH_CHECK(alpha.dim() == 0 || (alpha.dim() == 2 && alpha.size(0) == out && alpha.size(1) == in),
              "alpha: expected a 0-d tensor or shape [", out, ", ", in, "], got ", alpha.sizes());
  check_contiguous_like(alpha, weight, "alpha");
  TORCH_CHECK(rule >= 0 && rule <= 2, "rule: expected 0, 1 or 2, got ", rule);
  TORCH_CHECK(every >= 1, "every: expected >= 1, got ", every);
  TORCH_CHECK(!has_clip || clip > 0, "clip: expected a positive bound, got ", clip);
  PlasticShape s{};
  s.T = x.size(0), s.B = x.size(1), s.OUT = out, s.IN = in, s.every = every, s.clip = clip;
  s.rule = static_cast<PlasticRule>(rule);
  s.recurrent = recurrent, s.per_neuron = per_neuron, s.endogenous = endogenous, s.mod_tanh = mod_tanh;
  s.tanh = tanh, s.alpha_scalar = alpha.dim() == 0, s.has_clip = has_clip, s.recompute = recompute;
  return s;
}

// (blocks per sequence, whether the forward keeps the trace in shared memory) for B sequences of
// this layer on the current device; requested_parts 0 and requested_resident -1 let the kernels choose.
std::tuple<int64_t, bool> plastic_plan(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                                       bool recurrent, int64_t requested_parts, int64_t requested_resident) {
  const PlasticShape s = plastic_shape(x, weight, alpha, 0.0, 1, recurrent, 0, false, false, false, true, false, false);
  TORCH_CHECK(requested_parts >= 0, "parts: expected >= 0 (0: chosen), got ", requested_parts);
  TORCH_CHECK(requested_resident >= -1 && requested_resident <= 1, "resident: expected -1 (chosen), 0 or 1, got ",
              requested_resident);
  const KernelDeviceGuard guard(weight.device());
  PlasticPlan plan{};
  const cudaError_t err = neuronml_fast::cuda::plastic_plan(to_kernel_dtype(weight.scalar_type(), "weight"), s,
                                                            requested_parts,
                                                            static_cast<int>(requested_resident), &plan);
  TORCH_CHECK(err != cudaErrorInvalidValue, "plastic_plan: ", requested_parts, " blocks per sequence",
              requested_resident == 1 ? " with a resident trace" : "", " cannot run ", s.B, " sequences of a ", s.OUT,
              " x ", s.IN, " layer on this device");
  check_launch(err, "plastic_plan");
  return {plan.parts, plan.resident};
}

void plastic_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& eta,
                     const OptionalTensor& bias, const OptionalTensor& drive, const OptionalTensor& y0,
                     const OptionalTensor& modulation, const OptionalTensor& hebb, const OptionalTensor& mod_weight,
                     const OptionalTensor& mod_bias, const OptionalTensor& mod_fanout, at::Tensor& trace,
                     at::Tensor& output, at::Tensor& state, at::Tensor& checkpoints, const OptionalTensor& activity,
                     double clip, int64_t every, bool recurrent, int64_t rule, bool per_neuron, bool mod_tanh,
                     bool tanh, bool has_clip, int64_t parts, bool resident) {
  const PlasticShape s = plastic_shape(x, weight, alpha, clip, every, recurrent, rule, per_neuron,
                                       mod_weight.has_value(), mod_tanh, tanh, has_clip, false);
  const int64_t T = s.T, B = s.B, O = s.OUT, I = s.IN, matrix = O * I;
  TORCH_CHECK(!s.endogenous || activity, "activity: expected a buffer for the modulator's output");
  TORCH_CHECK(parts >= 1, "parts: expected >= 1, got ", parts);
  neuronml_fast::cuda::PlasticForwardArgs a{};
  a.x = x.data_ptr(), a.weight = weight.data_ptr(), a.alpha = alpha.data_ptr();
  a.eta = plastic_tensor(eta, weight, "eta", 1);
  a.bias = plastic_optional(bias, weight, "bias", O);
  a.drive = plastic_optional(drive, weight, "drive", T * B * O);
  a.y0 = plastic_optional(y0, weight, "y0", B * O);
  a.modulation = plastic_optional(modulation, weight, "modulation", per_neuron ? T * B * O : T * B);
  a.hebb = plastic_acc_optional(hebb, weight, "hebb", B * matrix);
  a.mod_weight = plastic_optional(mod_weight, weight, "mod_weight", O);
  a.mod_bias = plastic_optional(mod_bias, weight, "mod_bias", 1);
  a.mod_fanout = plastic_optional(mod_fanout, weight, "mod_fanout", O);
  a.trace = plastic_acc(trace, weight, "trace", B * matrix);
  a.output = plastic_tensor(output, weight, "output", T * B * O);
  a.state = plastic_acc(state, weight, "state", T * B * O);
  TORCH_CHECK((a.state == a.output) == (accumulation_dtype(weight.scalar_type()) == weight.scalar_type()),
              "state: expected the output itself exactly when the accumulation dtype is the input's");
  a.checkpoints = plastic_acc(checkpoints, weight, "checkpoints", ((T + every - 1) / every) * B * matrix);
  a.activity = plastic_acc_optional(activity, weight, "activity", T * B);
  TORCH_CHECK(rule != static_cast<int64_t>(PlasticRule::kModulated) || a.modulation || a.mod_weight,
              "modulation: the modulated rule needs a modulation or a modulator");
  const KernelDeviceGuard guard(weight.device());
  check_launch(neuronml_fast::cuda::plastic_forward(to_kernel_dtype(weight.scalar_type(), "weight"), s, a,
                                                    PlasticPlan{parts, resident}, current_stream()),
               "plastic_forward");
}

void plastic_backward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& eta,
                      const OptionalTensor& y0, const at::Tensor& output, const OptionalTensor& grad_output,
                      const OptionalTensor& modulation, const OptionalTensor& activity,
                      const OptionalTensor& mod_weight, const OptionalTensor& mod_fanout,
                      const at::Tensor& checkpoints, const at::Tensor& hebb_final,
                      const OptionalTensor& grad_hebb_in, const OptionalTensor& trace, const OptionalTensor& segment,
                      at::Tensor& grad_hebb, at::Tensor& grad_z, at::Tensor& grad_pre, at::Tensor& grad_z_out,
                      at::Tensor& grad_pre_out, const OptionalTensor& grad_mod,
                      const OptionalTensor& mod_rows, at::Tensor& alpha_part, at::Tensor& eta_part,
                      const OptionalTensor& mod_weight_part, const OptionalTensor& mod_bias_part,
                      const OptionalTensor& mod_fanout_part, double clip, int64_t every, bool recurrent, int64_t rule,
                      bool per_neuron, bool mod_tanh, bool tanh, bool has_clip, bool recompute, int64_t parts) {
  const PlasticShape s = plastic_shape(x, weight, alpha, clip, every, recurrent, rule, per_neuron,
                                       mod_weight.has_value(), mod_tanh, tanh, has_clip, recompute);
  const int64_t T = s.T, B = s.B, O = s.OUT, I = s.IN, matrix = O * I;
  const bool modulated = rule == static_cast<int64_t>(PlasticRule::kModulated);
  TORCH_CHECK(parts >= 1, "parts: expected >= 1, got ", parts);
  TORCH_CHECK(recompute ? segment.has_value() : trace.has_value(),
              recompute ? "segment: expected a buffer when segments are recomputed"
                        : "trace: expected a buffer when traces are reconstructed");
  TORCH_CHECK(!s.endogenous || (activity && mod_weight_part),
              "mod_weight: the modulator's backward needs activity and mod_weight_part");
  TORCH_CHECK(mod_fanout.has_value() == mod_fanout_part.has_value(),
              "mod_fanout_part: expected a buffer exactly when mod_fanout is given");
  TORCH_CHECK(!modulated || mod_rows, "mod_rows: expected a buffer for the modulated rule");
  TORCH_CHECK(!modulated || s.endogenous || (modulation && grad_mod),
              "modulation: the given modulation and its gradient buffer are needed");
  neuronml_fast::cuda::PlasticBackwardArgs a{};
  a.x = x.data_ptr(), a.weight = weight.data_ptr(), a.alpha = alpha.data_ptr();
  a.eta = plastic_tensor(eta, weight, "eta", 1);
  a.y0 = plastic_optional(y0, weight, "y0", B * O);
  a.output = plastic_acc(output, weight, "output", T * B * O);
  a.grad_output = plastic_optional(grad_output, weight, "grad_output", T * B * O);
  a.modulation = plastic_optional(modulation, weight, "modulation", per_neuron ? T * B * O : T * B);
  a.activity = plastic_acc_optional(activity, weight, "activity", T * B);
  a.mod_weight = plastic_optional(mod_weight, weight, "mod_weight", O);
  a.mod_fanout = plastic_optional(mod_fanout, weight, "mod_fanout", O);
  a.checkpoints = plastic_acc(checkpoints, weight, "checkpoints", ((T + every - 1) / every) * B * matrix);
  a.hebb_final = plastic_acc(hebb_final, weight, "hebb_final", B * matrix);
  a.grad_hebb_in = plastic_acc_optional(grad_hebb_in, weight, "grad_hebb", B * matrix);
  a.trace = plastic_acc_optional(trace, weight, "trace", B * matrix);
  a.segment = plastic_acc_optional(segment, weight, "segment", (every < T ? every : T) * B * matrix);
  a.grad_hebb = plastic_acc(grad_hebb, weight, "grad_hebb (out)", B * matrix);
  a.grad_z = plastic_acc(grad_z, weight, "grad_z", T * B * O);
  a.grad_pre = plastic_acc(grad_pre, weight, "grad_pre", recurrent ? B * O : T * B * I);
  a.grad_z_out = plastic_tensor(grad_z_out, weight, "grad_z_out", T * B * O);
  a.grad_pre_out = plastic_tensor(grad_pre_out, weight, "grad_pre_out", recurrent ? B * O : T * B * I);
  a.grad_mod = plastic_optional(grad_mod, weight, "grad_mod", per_neuron ? T * B * O : T * B);
  a.mod_rows = plastic_acc_optional(mod_rows, weight, "mod_rows", B * O);
  a.alpha_part = plastic_acc(alpha_part, weight, "alpha_part", s.alpha_scalar ? B * parts : B * matrix);
  a.eta_part = plastic_acc(eta_part, weight, "eta_part", B * parts);
  a.mod_weight_part = plastic_acc_optional(mod_weight_part, weight, "mod_weight_part", B * O);
  a.mod_bias_part = plastic_acc_optional(mod_bias_part, weight, "mod_bias_part", B);
  a.mod_fanout_part = plastic_acc_optional(mod_fanout_part, weight, "mod_fanout_part", B * O);
  const KernelDeviceGuard guard(weight.device());
  check_launch(neuronml_fast::cuda::plastic_backward(to_kernel_dtype(weight.scalar_type(), "weight"), s, a,
                                                     PlasticPlan{parts, false}, current_stream()),
               "plastic_backward");
}

void plastic_reduce(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                    const OptionalTensor& y0, const at::Tensor& output, const at::Tensor& grad_z,
                    const at::Tensor& alpha_part, const at::Tensor& eta_part, const OptionalTensor& mod_weight_part,
                    const OptionalTensor& mod_bias_part, const OptionalTensor& mod_fanout_part,
                    at::Tensor& grad_weight, const OptionalTensor& grad_bias, at::Tensor& grad_alpha,
                    at::Tensor& grad_eta, const OptionalTensor& grad_mod_weight, const OptionalTensor& grad_mod_bias,
                    const OptionalTensor& grad_mod_fanout, bool recurrent, int64_t parts) {
  const bool endogenous = mod_weight_part.has_value();
  const PlasticShape s = plastic_shape(x, weight, alpha, 0.0, 1, recurrent, 0, false, endogenous, false, true, false,
                                       false);
  const int64_t T = s.T, B = s.B, O = s.OUT, I = s.IN, matrix = O * I;
  TORCH_CHECK(parts >= 1, "parts: expected >= 1, got ", parts);
  TORCH_CHECK(recurrent || grad_bias, "grad_bias: expected a buffer for a linear layer");
  TORCH_CHECK(!endogenous || grad_mod_weight, "grad_mod_weight: expected a buffer for the modulator's reduction");
  TORCH_CHECK(mod_bias_part.has_value() == grad_mod_bias.has_value() &&
                  mod_fanout_part.has_value() == grad_mod_fanout.has_value(),
              "mod_bias_part, mod_fanout_part: expected each with its gradient buffer, or neither");
  neuronml_fast::cuda::PlasticReduceArgs a{};
  a.x = x.data_ptr();
  a.y0 = plastic_optional(y0, weight, "y0", B * O);
  a.output = plastic_acc(output, weight, "output", T * B * O);
  a.grad_z = plastic_acc(grad_z, weight, "grad_z", T * B * O);
  a.alpha_part = plastic_acc(alpha_part, weight, "alpha_part", s.alpha_scalar ? B * parts : B * matrix);
  a.eta_part = plastic_acc(eta_part, weight, "eta_part", B * parts);
  a.mod_weight_part = plastic_acc_optional(mod_weight_part, weight, "mod_weight_part", B * O);
  a.mod_bias_part = plastic_acc_optional(mod_bias_part, weight, "mod_bias_part", B);
  a.mod_fanout_part = plastic_acc_optional(mod_fanout_part, weight, "mod_fanout_part", B * O);
  a.grad_weight = plastic_tensor(grad_weight, weight, "grad_weight", matrix);
  a.grad_bias = recurrent ? nullptr : plastic_optional(grad_bias, weight, "grad_bias", O);
  a.grad_alpha = plastic_tensor(grad_alpha, weight, "grad_alpha", s.alpha_scalar ? 1 : matrix);
  a.grad_eta = plastic_tensor(grad_eta, weight, "grad_eta", 1);
  a.grad_mod_weight = plastic_optional(grad_mod_weight, weight, "grad_mod_weight", O);
  a.grad_mod_bias = plastic_optional(grad_mod_bias, weight, "grad_mod_bias", 1);
  a.grad_mod_fanout = plastic_optional(grad_mod_fanout, weight, "grad_mod_fanout", O);
  const KernelDeviceGuard guard(weight.device());
  check_launch(neuronml_fast::cuda::plastic_reduce(to_kernel_dtype(weight.scalar_type(), "weight"), s, a, parts,
                                                   current_stream()),
               "plastic_reduce");
}

#ifdef NEURONML_FAST_CUDA_EMULATION
// The emulated device and schedule (csrc/emu/cuda_emu.h); unset values keep their setting.
void configure_emulation(const c10::optional<std::string>& order, const c10::optional<int64_t>& seed,
                         const c10::optional<int64_t>& max_grid_yz, const c10::optional<int64_t>& optin_shared_bytes,
                         const c10::optional<int64_t>& multiprocessors, const c10::optional<bool>& count_only) {
  nf_emu::Config& c = nf_emu::config();
  if (order) {
    TORCH_CHECK(*order == "forward" || *order == "reverse" || *order == "random",
                "order: expected 'forward', 'reverse' or 'random', got '", *order, "'");
    c.order = *order == "forward" ? nf_emu::Order::kForward
            : *order == "reverse" ? nf_emu::Order::kReverse
                                  : nf_emu::Order::kRandom;
  }
  if (seed) c.seed = static_cast<uint64_t>(*seed);
  if (max_grid_yz) {
    TORCH_CHECK(*max_grid_yz >= 1 && *max_grid_yz <= 65535, "max_grid_yz: expected 1..65535, got ", *max_grid_yz);
    c.max_grid_yz = *max_grid_yz;
  }
  if (optin_shared_bytes) {
    TORCH_CHECK(*optin_shared_bytes >= c.default_shared_bytes && *optin_shared_bytes <= (1 << 20),
                "optin_shared_bytes: expected ", c.default_shared_bytes, "..", 1 << 20, ", got ", *optin_shared_bytes);
    c.optin_shared_bytes = *optin_shared_bytes;
  }
  if (multiprocessors) {
    TORCH_CHECK(*multiprocessors >= 1 && *multiprocessors <= 1024, "multiprocessors: expected 1..1024, got ",
                *multiprocessors);
    c.multiprocessors = *multiprocessors;
  }
  if (count_only) c.count_only = *count_only;
}

// One of the emulation's own checks (csrc/emu/selftest.cu), reading `input` and writing into `out`
// (and `out2`).
void emulation_selftest(const std::string& name, at::Tensor& out, int64_t arg, bool flag,
                        const c10::optional<at::Tensor>& out2, const c10::optional<at::Tensor>& input) {
  namespace st = nf_emu::selftest;
  TORCH_CHECK(out.is_cpu() && out.is_contiguous(), "out: expected a contiguous CPU tensor");
  const auto need = [&](at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(out.scalar_type() == dtype && out.numel() >= numel, name, ": out: expected ", numel, " ", dtype,
                " elements, got ", out.numel(), " ", out.scalar_type());
  };
  cudaError_t err = cudaErrorInvalidValue;
  if (name == "warp_ops") {
    need(at::kInt, 32 * 8);
    err = st::warp_ops(out.data_ptr<int>());
  } else if (name == "barrier_race") {
    need(at::kInt, arg);
    err = st::barrier_race(flag, static_cast<int>(arg), out.data_ptr<int>());
  } else if (name == "lane_race" || name == "exited_lanes" || name == "shuffle_against_barrier") {
    need(at::kInt, 32);
    err = name == "lane_race" ? st::lane_race(flag, out.data_ptr<int>())
        : name == "exited_lanes" ? st::exited_lanes(out.data_ptr<int>())
                                 : st::shuffle_against_barrier(out.data_ptr<int>());
  } else if (name == "dynamic_shared") {
    need(at::kFloat, 1);
    err = st::dynamic_shared(arg, flag, out.data_ptr<float>());
  } else if (name == "big_static_shared") {
    need(at::kDouble, 32);
    err = st::big_static_shared(out.data_ptr<double>());
  } else if (name == "unwritten_shared") {
    need(at::kFloat, 64);
    err = st::unwritten_shared(out.data_ptr<float>());
  } else if (name == "grid") {
    need(at::kInt, arg);
    err = st::grid(static_cast<unsigned>(arg), out.data_ptr<int>());
  } else if (name == "too_many_threads") {
    need(at::kInt, 1);
    err = st::too_many_threads(out.data_ptr<int>());
  } else if (name.rfind("grid_barrier", 0) == 0) {
    need(at::kInt, 2 * arg);
    const st::GridMode mode = name == "grid_barrier"                  ? st::GridMode::kBarrier
                              : name == "grid_barrier_skipped"        ? st::GridMode::kNone
                              : name == "grid_barrier_not_cooperative" ? st::GridMode::kNotCooperative
                              : name == "grid_barrier_after_exit"     ? st::GridMode::kExit
                                                                      : st::GridMode::kSplit;
    TORCH_CHECK(mode != st::GridMode::kSplit || name == "grid_barrier_against_block_barrier",
                "name: unknown emulation self-test '", name, "'");
    err = st::grid_barrier(mode, static_cast<int>(arg), out.data_ptr<int>());
  } else if (name == "atomic_sums") {
    need(at::kFloat, 1);
    TORCH_CHECK(out2 && out2->scalar_type() == at::kDouble && out2->numel() >= 1, "out2: expected a float64 tensor");
    err = st::atomic_sums(static_cast<int>(arg), out.data_ptr<float>(), out2->data_ptr<double>());
  } else if (name == "bf16_conversions") {
    TORCH_CHECK(input && input->is_cpu() && input->is_contiguous() && input->scalar_type() == at::kFloat,
                "input: expected a contiguous float32 CPU tensor");
    need(at::kFloat, 3 * input->numel());
    err = st::bf16_conversions(input->data_ptr<float>(), static_cast<int>(input->numel()), out.data_ptr<float>());
  } else if (name == "wmma_mapping") {
    need(at::kFloat, 256);
    err = st::wmma_mapping(out.data_ptr<float>());
  } else if (name == "wmma_misuse") {
    need(at::kFloat, 1024);
    err = st::wmma_misuse(static_cast<int>(arg), out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "name: unknown emulation self-test '", name, "'");
  }
  check_launch(err, name.c_str());
}

// The emulated WMMA GEMM (csrc/emu/selftest.h, `wmma_gemm`): D = alpha * (A B + C). `input` names
// the multiplicands' fragment type: "f16", "bf16", "tf32" or "f64"; each matrix is a contiguous
// buffer of its shape in its layout.
void emulation_wmma_gemm(const std::string& input, const at::Tensor& a, const at::Tensor& b,
                         const c10::optional<at::Tensor>& c, at::Tensor& d, bool a_col_major, bool b_col_major,
                         bool c_col_major, bool d_col_major, double alpha, bool convert) {
  namespace st = nf_emu::selftest;
  const std::map<std::string, std::tuple<st::WmmaInput, at::ScalarType, at::ScalarType, int64_t, int64_t, int64_t>>
      kinds = {{"f16", {st::WmmaInput::kHalf, at::kHalf, at::kFloat, 16, 16, 16}},
               {"bf16", {st::WmmaInput::kBfloat16, at::kBFloat16, at::kFloat, 16, 16, 16}},
               {"tf32", {st::WmmaInput::kTf32, at::kFloat, at::kFloat, 16, 16, 8}},
               {"f64", {st::WmmaInput::kDouble, at::kDouble, at::kDouble, 8, 8, 4}}};
  const auto kind = kinds.find(input);
  TORCH_CHECK(kind != kinds.end(), "input: expected 'f16', 'bf16', 'tf32' or 'f64', got '", input, "'");
  const auto [which, in_type, acc_type, m, n, k] = kind->second;
  const auto check = [](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel, name,
                ": expected a contiguous CPU tensor of ", numel, " ", dtype, " elements, got ", t.numel(), " ",
                t.scalar_type());
  };
  check(a, "a", in_type, 4 * m * k);
  check(b, "b", in_type, 2 * k * n);
  if (c) check(*c, "c", acc_type, 2 * m * n);
  check(d, "d", acc_type, 2 * m * n);
  const st::WmmaGemm g{a_col_major, b_col_major, c_col_major, d_col_major, c.has_value(), convert, alpha};
  check_launch(st::wmma_gemm(which, a.data_ptr(), b.data_ptr(), c ? c->data_ptr() : nullptr, d.data_ptr(), g),
               "wmma_gemm");
}

py::dict emulation_state() {
  const nf_emu::Config& c = nf_emu::config();
  const nf_emu::Stats& s = nf_emu::stats();
  py::dict d;
  d["order"] = c.order == nf_emu::Order::kForward ? "forward" : c.order == nf_emu::Order::kReverse ? "reverse" : "random";
  d["seed"] = c.seed;
  d["max_grid_yz"] = c.max_grid_yz;
  d["optin_shared_bytes"] = c.optin_shared_bytes;
  d["multiprocessors"] = c.multiprocessors;
  d["count_only"] = c.count_only;
  d["launches"] = s.launches.load();
  d["grid_barriers"] = s.grid_barriers.load();
  d["failed_launches"] = s.failed_launches.load();
  d["blocks"] = s.blocks.load();
  d["threads"] = s.threads.load();
  d["switches"] = s.switches.load();
  return d;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef NEURONML_FAST_CUDA_EMULATION
  m.doc() = "neuronml_fast CUDA C++ kernels, emulated on the CPU";
  m.def("configure_emulation", &configure_emulation, "set the emulated schedule and device limits",
        py::arg("order") = py::none(), py::arg("seed") = py::none(), py::arg("max_grid_yz") = py::none(),
        py::arg("optin_shared_bytes") = py::none(), py::arg("multiprocessors") = py::none(),
        py::arg("count_only") = py::none());
  m.def("emulation_state", &emulation_state, "the emulated schedule, limits and counters");
  m.def("emulation_selftest", &emulation_selftest, "one of the emulation's own checks", py::arg("name"),
        py::arg("out"), py::arg("arg") = 0, py::arg("flag") = false, py::arg("out2") = py::none(),
        py::arg("input") = py::none());
  m.def("emulation_wmma_gemm", &emulation_wmma_gemm, "the emulated WMMA GEMM: d = alpha * (a b + c)",
        py::arg("input"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("a_col_major"),
        py::arg("b_col_major"), py::arg("c_col_major"), py::arg("d_col_major"), py::arg("alpha"),
        py::arg("convert"));
#else
  m.doc() = "neuronml_fast CUDA C++ kernels";
#endif
  m.def("neuron_sensitivity_out", &neuron_sensitivity_out, "Per-neuron Taylor sensitivity (SPEC 3)",
        py::arg("weight"), py::arg("grad_weight"), py::arg("bias"), py::arg("grad_bias"), py::arg("sensitivity"),
        py::arg("taylor"));
  // Constants the Python launchers need (neuronml_fast/ops/*/cuda.py read them from here).
  m.attr("MASKED_K_STEP") = neuronml_fast::cuda::kMaskedBK;
  m.attr("MASKED_MAX_INDEX") = neuronml_fast::cuda::kMaskedMaxIndex;
  m.attr("PLASTIC_RULE_CODES") = py::dict(py::arg("hebb") = static_cast<int>(PlasticRule::kHebb),
                                          py::arg("oja") = static_cast<int>(PlasticRule::kOja),
                                          py::arg("modulated") = static_cast<int>(PlasticRule::kModulated));
  m.def("plastic_plan", &plastic_plan, "blocks per sequence and resident trace of the plastic kernels (SPEC 4)");
  m.def("plastic_forward", &plastic_forward, "the plastic forward, the whole time loop in one launch (SPEC 4)");
  m.def("plastic_backward", &plastic_backward, "the plastic reverse walk, one launch (SPEC 4)");
  m.def("plastic_reduce", &plastic_reduce, "the plastic backward's reductions, one launch (SPEC 4)");
  m.def("masked_conv_forward_out", &masked_conv_forward_out, "masked conv forward (SPEC 2)");
  m.def("masked_conv_input_grad_out", &masked_conv_input_grad_out, "masked conv grad_input (SPEC 2)");
  m.def("masked_conv_weight_grad_out", &masked_conv_weight_grad_out,
        "masked conv grad_weight, grad_bias, grad_mask (SPEC 2); partial sums added by a second launch when split");
}
