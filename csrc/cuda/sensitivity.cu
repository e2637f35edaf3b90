#include "cuda/common.cuh"
#include "cuda/sensitivity.h"

namespace neuronml_fast::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

// One warp per neuron: a coalesced strided walk over the row, a shuffle reduction, one store.
// Memory bound, so the only goal is to stream weight and grad_weight once at full bandwidth.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
neuron_sensitivity_kernel(const T* __restrict__ weight, int64_t weight_row_stride,
                          const T* __restrict__ grad_weight, int64_t grad_row_stride,
                          const T* __restrict__ bias, int64_t bias_stride,
                          const T* __restrict__ grad_bias, int64_t grad_bias_stride,
                          int64_t rows, int64_t cols,
                          typename Acc<T>::type* __restrict__ sensitivity,
                          typename Acc<T>::type* __restrict__ taylor) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* w = weight + row * weight_row_stride;
  const T* g = grad_weight + row * grad_row_stride;
  A acc = A(0);
  for (int64_t k = lane; k < cols; k += 32) acc += to_acc<A>(w[k]) * to_acc<A>(g[k]);
  acc = warp_all_sum(acc);
  if (lane == 0) {
    if (bias != nullptr) acc += to_acc<A>(bias[row * bias_stride]) * to_acc<A>(grad_bias[row * grad_bias_stride]);
    taylor[row] = acc;
    sensitivity[row] = acc < A(0) ? -acc : acc;
  }
}

template <typename T>
cudaError_t launch(const void* weight, int64_t weight_row_stride, const void* grad_weight, int64_t grad_row_stride,
                   const void* bias, int64_t bias_stride, const void* grad_bias, int64_t grad_bias_stride,
                   int64_t rows, int64_t cols, void* sensitivity, void* taylor, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (rows == 0) return cudaSuccess;
  const int blocks = ceil_div(rows, kWarpsPerBlock);
  neuron_sensitivity_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(weight), weight_row_stride, static_cast<const T*>(grad_weight), grad_row_stride,
      static_cast<const T*>(bias), bias_stride, static_cast<const T*>(grad_bias), grad_bias_stride, rows, cols,
      static_cast<A*>(sensitivity), static_cast<A*>(taylor));
  return cudaGetLastError();
}

}  // namespace

cudaError_t neuron_sensitivity(DType dtype, const void* weight, int64_t weight_row_stride,
                               const void* grad_weight, int64_t grad_row_stride,
                               const void* bias, int64_t bias_stride,
                               const void* grad_bias, int64_t grad_bias_stride,
                               int64_t rows, int64_t cols,
                               void* sensitivity, void* taylor, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(weight, weight_row_stride, grad_weight, grad_row_stride, bias, bias_stride, grad_bias,
                           grad_bias_stride, rows, cols, sensitivity, taylor, stream);
    case DType::kFloat64:
      return launch<double>(weight, weight_row_stride, grad_weight, grad_row_stride, bias, bias_stride, grad_bias,
                            grad_bias_stride, rows, cols, sensitivity, taylor, stream);
    case DType::kFloat16:
      return launch<__half>(weight, weight_row_stride, grad_weight, grad_row_stride, bias, bias_stride, grad_bias,
                            grad_bias_stride, rows, cols, sensitivity, taylor, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(weight, weight_row_stride, grad_weight, grad_row_stride, bias, bias_stride,
                                   grad_bias, grad_bias_stride, rows, cols, sensitivity, taylor, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace neuronml_fast::cuda
