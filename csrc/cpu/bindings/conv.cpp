// Bindings of the task-batched convolution's own kernels: the conv weight and input gradients
// (NHWC, float32, AVX2 register tiles; csrc/cpu/conv_grad.h) and the grouped-NHWC layout
// (csrc/cpu/layout.h).
#include "cpu/bindings/bindings.h"

#include "common/conv_size.h"
#include "cpu/conv_grad.h"
#include "cpu/layout.h"

namespace neuronml_fast::cpu::bindings {
namespace {

using neuronml_fast::cpu::ConvGradShape;

void check_conv_grad_tensors(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  TORCH_CHECK(neuronml_fast::cpu::conv2d_grad_available(),
              "the AVX2/FMA convolution-gradient kernels are not in use here (see vector_isa())");
  for (auto [t, name] : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, name,
                ": expected a float32 CPU tensor, got ", t->scalar_type(), " on ", t->device());
    checks::check_contiguous(*t, name);
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

}  // namespace

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

void bind_conv(py::module_& m) {
  m.def("conv2d_weight_grad_out", &conv2d_weight_grad_out, "NHWC conv weight gradient, AVX2 register tiles",
        py::arg("grad_out"), py::arg("input"), py::arg("grad_weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("conv2d_input_grad_out", &conv2d_input_grad_out,
        "conv input gradient (grouped NHWC [N, H, W, T*C] or NCHW [T, N, C, H, W]), AVX2 register tiles",
        py::arg("grad_out"), py::arg("weight"), py::arg("grad_input"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("conv_grad_available", &neuronml_fast::cpu::conv2d_grad_available,
        "whether conv2d_weight_grad_out / conv2d_input_grad_out run (their AVX2/FMA kernels are in use)");
  m.def("to_grouped_nhwc_out", &to_grouped_nhwc_out,
        "[T, N, C, H, W] contiguous -> [N, H, W, T, C] (grouped NHWC storage), 8 x 8 register transposes",
        py::arg("input"), py::arg("out"));
}

}  // namespace neuronml_fast::cpu::bindings
