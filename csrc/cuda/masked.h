// Masked (structure-gated) convolution on CUDA (SPEC section 2): host-side launcher declarations.
// Framework-free; bindings.cpp validates tensors and calls in. Same design as the Triton kernels (kernels/masked.py):
// implicit GEMM over the active neurons of each (task, group), which every block finds itself
// from the mask row on the device (a block-wide prefix count: no planning launch, no host
// synchronization), mask * (conv + bias) in the forward epilogue, grad_out * mask + grad_pre
// fused into the backward operand loads, bias and mask gradients reduced inside the
// weight-gradient kernel. A linear layer is a 1x1 conv of a 1x1 image.
//
// The GEMMs run on the tensor cores through WMMA: float16 and bfloat16 on HMMA (m16n16k16, float
// accumulation), float32 on HMMA as TF32 (m16n16k8, operands rounded with __float_to_tf32) when
// the caller asks for TF32 and on exact FFMA otherwise, float64 on DMMA (m8n8k4, exact fp64
// fused multiply-adds). Index math is 32-bit, within one task: see kMaskedMaxIndex.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "cuda/sensitivity.h"  // DType

namespace neuronml_fast::cuda {

// The GEMM tiles: kMaskedBM x kMaskedBN outputs per block of kMaskedThreads threads (8 warps of
// 16 x 32 outputs on the tensor cores, or 4 x 4 per thread on FFMA), kMaskedBK-deep K steps.
// The weight gradient's pixel reduction is split in multiples of kMaskedBK (the launcher reads
// it from the extension).
constexpr int kMaskedBM = 64, kMaskedBN = 64, kMaskedBK = 16, kMaskedThreads = 256, kMaskedTM = 4, kMaskedTN = 4;
static_assert((kMaskedBM / kMaskedTM) * (kMaskedBN / kMaskedTN) == kMaskedThreads, "one micro-tile per thread");

// The kernels index one task's tensors in 32 bits (a 64-bit base per task, then int offsets):
// each of a task's input, output and weight may hold at most this many elements (2^31 - 1 less
// the headroom of a tile, which a block's indices may run past the end by), as may
// tasks x groups x splits. Above it the launchers return cudaErrorInvalidValue (the bindings and
// the Python launcher say which tensor first).
constexpr int64_t kMaskedMaxIndex = 2147483647LL - 1024;

// How a float32 GEMM multiplies: exact float32 products (FFMA), or operands rounded to TF32 on
// the tensor cores. The other dtypes ignore it.
enum class Fp32Gemm { kExact, kTf32 };

struct ConvShape {
  int64_t T, N, H, W, HO, WO, CIN, COUT, CIN_G, COUT_G, G, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool skip_zero;  // a channel whose mask is 0 is pruned (not computed, exact zeros)
};

// Which of a task's tensors is over kMaskedMaxIndex ("input", "output", "weight" or "tasks x
// groups"), or nullptr when the kernels index the problem in 32 bits.
const char* masked_conv_index_overflow(const ConvShape& s);

// x [T, N, CIN, H, W], weight [T, COUT, CIN_G, KH, KW], mask / bias [T, COUT] (bias may be null);
// all contiguous. Writes out and pre, both [T, N, COUT, HO, WO]. One launch (per chunk of the
// device's grid z limit).
cudaError_t masked_conv_forward(DType dtype, Fp32Gemm fp32, const ConvShape& s, const void* x, const void* weight,
                                const void* mask, const void* bias, void* out, void* pre, cudaStream_t stream);

// grad_input [T, N, CIN, H, W] from grad_out (and grad_pre, may be null). One launch.
cudaError_t masked_conv_input_grad(DType dtype, Fp32Gemm fp32, const ConvShape& s, const void* grad_out,
                                   const void* grad_pre, const void* weight, const void* mask, void* grad_input,
                                   cudaStream_t stream);

// grad_weight [T, COUT, CIN_G*KH*KW] (skipped when null), grad_bias and grad_mask [T, COUT], in
// `dtype`; pre may be null (grad_mask then 0). The output pixels are reduced in `splits` chunks
// of `pixels_per_split`: with one split the kernel writes the gradients; with more, each writes
// its partial sums into `part` [splits, n_w + 2 * T * COUT] (accumulation type: float, or double
// for DType::kFloat64; n_w = 0 without grad_weight, else its size) and a second launch adds them
// in split order (deterministic) into the gradients.
cudaError_t masked_conv_weight_grad(DType dtype, Fp32Gemm fp32, const ConvShape& s, const void* grad_out,
                                    const void* grad_pre, const void* pre, const void* x, const void* mask,
                                    int64_t splits, int64_t pixels_per_split, void* part, void* grad_weight,
                                    void* grad_bias, void* grad_mask, cudaStream_t stream);

}  // namespace neuronml_fast::cuda
