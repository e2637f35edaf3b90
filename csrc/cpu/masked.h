// Fused epilogue and prologue of the masked (structure-gated) layers on the CPU (SPEC section 2).
// Framework-free. The dense core (the convolution or matmul over active neurons only) is done
// by ATen/oneDNN on compacted weights; these loops fuse everything around it in one pass:
//
//   forward epilogue : pre = y + bias, out = mask * pre, scattered from the compact result y
//                      into the full layout, zeros written for pruned neurons
//   backward prologue: gy = grad_out * mask + grad_pre gathered into the compact layout,
//                      grad_bias = sum gy, grad_mask = sum grad_out * pre (the sensitivity source)
//
// Layouts: the compact tensor is channels last (convolutions run in NHWC on the CPU; a linear
// layer's sample is a one-pixel image): (t, n, s, j) at y + t*stride_t + n*stride_n + s*stride_s + j,
// slots contiguous. The full tensors hold (t, n, s, c) at full + t*full_t + n*full_n + s*full_s +
// c*full_c: channels last (full_c == 1), or channels first (full_s == 1: a contiguous NCHW
// output, as PyTorch's conv2d returns for a contiguous input). slot[t*C + c] is the compact slot
// of channel c of task t, or -1 if pruned. float32 with C % 8 == 0 moves 8 channels per permute
// (AVX2; channels first: 8 pixels at a time, through 8 x 8 register transposes); other cases go
// channel by channel.
#pragma once
#include <cstdint>

namespace neuronml_fast::cpu {

struct MaskedLayout {
  int64_t T, N, C, S;
  int64_t stride_t, stride_n, stride_s;  // compact strides (elements)
  int64_t full_t, full_n, full_s;        // strides of out / pre / grad_out / grad_pre (elements)
  int64_t full_c;                        // 1 (channels last) or any, with full_s == 1 (channels first)

  bool channels_first() const { return full_c != 1; }
};

// Compaction plan of a [tasks, C] mask (kept: mask != 0 under skip_zero, else every channel).
// With `allow` and some channel pruned, the kept channels of each task get slots 0, 1, ... in
// order and the width is the largest kept count; otherwise slot c for every kept channel and
// width C. slot[t*C + c] = the slot of channel c of task t, or -1 when pruned.
struct CompactionPlan {
  int64_t width;
  bool compacted;  // slots are compact (else the identity on kept channels)
  bool complete;   // every slot < width of every task holds a channel
};

template <typename T>
CompactionPlan plan_compaction(const T* mask, int64_t tasks, int64_t C, bool skip_zero, bool allow, int64_t* slot);

// Rows of `row` elements (contiguous). gather: dst[t, j] = src[t, c] where slot[t, c] == j, zero
// rows for slots that hold no channel. scatter: dst[t, c] = src[t, slot[t, c]], zero for pruned.
// src rows at src + t*src_t + c*src_c (gather) / + j*src_c (scatter); dst contiguous.
template <typename T>
void gather_rows(const T* src, int64_t src_t, int64_t src_c, int64_t tasks, int64_t C, int64_t row,
                 const int64_t* slot, int64_t width, T* dst);

template <typename T>
void scatter_rows(const T* src, int64_t src_t, int64_t src_c, int64_t tasks, int64_t C, int64_t row,
                  const int64_t* slot, T* dst);

template <typename T>
void masked_forward_epilogue(const MaskedLayout& L, const T* y, const int64_t* slot, const T* mask, const T* bias,
                             T* out, T* pre);

template <typename T>
void masked_backward_prologue(const MaskedLayout& L, const T* grad_out, const T* grad_pre, const T* pre,
                              const int64_t* slot, const T* mask, T* gy, T* grad_bias, T* grad_mask);

}  // namespace neuronml_fast::cpu
