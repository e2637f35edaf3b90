// Masked (structure-gated) convolution on CUDA (SPEC section 2): host-side launcher declarations.
// Framework-free; bindings.cpp validates tensors and calls in with the device-side compaction
// (order, count) that neuronml_fast/ops/masked/gpu.py computes with torch ops. Same design as the Triton kernels (kernels/masked.py):
// implicit GEMM over the active neurons of each (task, group), mask * (conv + bias) in the forward
// epilogue, grad_out * mask + grad_pre fused into the backward operand loads, bias and mask
// gradients reduced inside the weight-gradient kernel. A linear layer is a 1x1 conv of a 1x1 image.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "cuda/sensitivity.h"  // DType

namespace neuronml_fast::cuda {

// The GEMM tiles: kMaskedBM x kMaskedBN outputs per block of kMaskedThreads threads, each owning a
// kMaskedTM x kMaskedTN micro-tile, kMaskedBK-deep K steps. The weight gradient's pixel
// reduction is split in multiples of kMaskedBK (the launcher reads it from the extension).
constexpr int kMaskedBM = 64, kMaskedBN = 64, kMaskedBK = 16, kMaskedThreads = 256, kMaskedTM = 4, kMaskedTN = 4;
static_assert((kMaskedBM / kMaskedTM) * (kMaskedBN / kMaskedTN) == kMaskedThreads, "one micro-tile per thread");

struct ConvShape {
  int64_t T, N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// x [T, N, CIN, H, W], weight [T, COUT, CIN_G, KH, KW], mask / bias [T, COUT] (bias may be null),
// order [T*G, COUT_G] (channels of each group, active first), count [T*G]; all contiguous.
// Writes out and pre, both [T, N, COUT, HO, WO].
cudaError_t masked_conv_forward(DType dtype, const ConvShape& s, const void* x, const void* weight,
                                const void* mask, const void* bias, const int32_t* order, const int32_t* count,
                                void* out, void* pre, cudaStream_t stream);

// grad_input [T, N, CIN, H, W] from grad_out (and grad_pre, may be null).
cudaError_t masked_conv_input_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                   const void* weight, const void* mask, const int32_t* order,
                                   const int32_t* count, void* grad_input, cudaStream_t stream);

// Partial sums over `splits` chunks of output pixels, in the accumulation type (float, or double
// for DType::kFloat64): grad_weight_part [splits, T, COUT, CIN_G*KH*KW] (skipped when null),
// grad_bias_part and grad_mask_part [splits, T, COUT]. pre may be null (grad_mask then 0).
cudaError_t masked_conv_weight_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                    const void* pre, const void* x, const void* mask, const int32_t* order,
                                    const int32_t* count, int64_t splits, int64_t pixels_per_split,
                                    void* grad_weight_part, void* grad_bias_part, void* grad_mask_part,
                                    cudaStream_t stream);

}  // namespace neuronml_fast::cuda
