// Per-neuron Taylor sensitivity on CUDA (SPEC section 3). Host-side launcher declarations;
// framework-free so bindings.cpp (torch) and sensitivity.cu (nvcc) share only this.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace neuronml_fast::cuda {

// Same contract as the CPU kernel. T is float, double, __half or __nv_bfloat16 (passed as
// void* so that this header needs no CUDA type headers); A, the output/accumulation type, is
// double for double and float otherwise. Returns the launch status; never synchronizes.
enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

cudaError_t neuron_sensitivity(DType dtype, const void* weight, int64_t weight_row_stride,
                               const void* grad_weight, int64_t grad_row_stride,
                               const void* bias, int64_t bias_stride,
                               const void* grad_bias, int64_t grad_bias_stride,
                               int64_t rows, int64_t cols,
                               void* sensitivity, void* taylor, cudaStream_t stream);

}  // namespace neuronml_fast::cuda
