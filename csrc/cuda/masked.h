// Masked (structure-gated) convolution on CUDA (SPEC section 2): host-side launcher declarations.
// Framework-free; bindings.cpp validates tensors and calls in. Same design as the Triton kernels (kernels/masked.py):
// implicit GEMM over the active neurons of each (task, group), which every block finds itself
// from the mask row on the device (a block-wide prefix count: no planning launch, no host
// synchronization), mask * (conv + bias) in the forward epilogue, grad_out * mask + grad_pre
// fused into the backward operand loads, bias and mask gradients reduced inside the
// weight-gradient kernel. A linear layer is a 1x1 conv of a 1x1 image.
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
  bool skip_zero;  // a channel whose mask is 0 is pruned (not computed, exact zeros)
};

// x [T, N, CIN, H, W], weight [T, COUT, CIN_G, KH, KW], mask / bias [T, COUT] (bias may be null);
// all contiguous. Writes out and pre, both [T, N, COUT, HO, WO]. One launch (per chunk of the
// device's grid z limit).
cudaError_t masked_conv_forward(DType dtype, const ConvShape& s, const void* x, const void* weight,
                                const void* mask, const void* bias, void* out, void* pre, cudaStream_t stream);

// grad_input [T, N, CIN, H, W] from grad_out (and grad_pre, may be null). One launch.
cudaError_t masked_conv_input_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                   const void* weight, const void* mask, void* grad_input, cudaStream_t stream);

// grad_weight [T, COUT, CIN_G*KH*KW] (skipped when null), grad_bias and grad_mask [T, COUT], in
// `dtype`; pre may be null (grad_mask then 0). The output pixels are reduced in `splits` chunks
// of `pixels_per_split`: with one split the kernel writes the gradients; with more, each writes
// its partial sums into `part` [splits, n_w + 2 * T * COUT] (accumulation type: float, or double
// for DType::kFloat64; n_w = 0 without grad_weight, else its size) and a second launch adds them
// in split order (deterministic) into the gradients.
cudaError_t masked_conv_weight_grad(DType dtype, const ConvShape& s, const void* grad_out, const void* grad_pre,
                                    const void* pre, const void* x, const void* mask, int64_t splits,
                                    int64_t pixels_per_split, void* part, void* grad_weight, void* grad_bias,
                                    void* grad_mask, cudaStream_t stream);

}  // namespace neuronml_fast::cuda
