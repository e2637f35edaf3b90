// Weight and input gradients of an NHWC convolution, float32, AVX2/FMA register tiles.
// Framework-free.
//
// Weight gradient. Why: oneDNN's channels-last weight gradient is slow for the Conv4-Omniglot
// block with few active output channels (16 of 64: twice its forward's time), slower still in
// MAML's task-batched grouped form, and it is the largest piece of a masked conv's backward.
// Here each (image, output row) stages its input rows and output-gradient row in L1 and sweeps
// every (tap, 16 input channels, 6 output channels) tile over them: 12 accumulators in
// registers, 2 loads + 6 broadcasts per 12 FMAs.
//
// Layouts (elements):
//   gy  output gradient: pixel (n, oh, ow) at gy + ((n*H_out + oh)*W_out + ow)*gy_pixel, then A channels
//   x   input:           pixel (n, ih, iw) at x + ((n*H + ih)*W + iw)*x_pixel, then C channels
//   gw  [A, kH, kW, C] contiguous (oneDNN's channels-last weight layout), overwritten
// (gy_pixel and x_pixel are T*A and T*C for the grouped-NHWC task-batched storage, with gy and x
// offset to the task.) Requires C % 16 == 0.
//
// Input gradient. Why: oneDNN returns it in a buffer it allocates, and the page faults of a fresh
// 4 MiB buffer cost as much as the transposed convolution of a 25 %-active Conv4 block itself
// (buffer_pool.h); this kernel writes into the caller's pooled buffer. Each (image, input row)
// is one output row of gx, owned by one thread. With a column stride of 1 (the common case), a
// (5 columns, 16 input channels) register tile sums gy[.., a] * w[a, kh, kw, c] over every tap
// and active channel and stores once; the gy rows are staged zero-padded in L1 so edge columns
// need no special case. Other column strides: the row is zeroed, then every (tap, 16 input
// channels, 6 positions) tile adds its sum over the A active channels into it.
// Any stride, padding and dilation.
//   w   [A, kH, kW, C] contiguous (the compact channels-last weights)
//   gx  channels-last like x, or channels-first (NCHW, the layout of a user's input: autograd then
//       adds it into x.grad without a transposing pass): each row is summed channels-last in L1
//       and transposed into place in 8 x 8 register blocks.
#pragma once
#include <cstdint>

namespace neuronml_fast::cpu {

struct ConvGradShape {
  int64_t N, H, W, C, H_out, W_out, A, KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t gy_pixel, x_pixel;
};

// Whether the AVX2/FMA kernels run here (isa.h: the CPU has both and the portable path is not
// forced). Otherwise the two functions below do nothing and the caller uses its dense library.
bool conv2d_grad_available();

// `tasks` independent convolutions (the task-batched form): task t reads gy + t*gy_task and
// x + t*x_task and writes gw + t*A*kH*kW*C (gw: [tasks, A, kH, kW, C]).
void conv2d_weight_grad_nhwc(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t x_task,
                             const float* gy, const float* x, float* gw);

// Where input-gradient element (t, n, c, h, w) lives: gx + t*task + n*image + h*row + w*pixel +
// c*channel. Either channel == 1 (grouped NHWC: pixel = T*C, task = C) or pixel == 1 (NCHW per
// task, the layout of a user's input: channel = H*W, task = N*C*H*W).
struct InputGradLayout {
  int64_t task, image, row, pixel, channel;
};

// `tasks` independent convolutions: task t reads gy + t*gy_task and w + t*w_task (w_task = 0: one
// weight shared by every task, as MAML's meta-parameters are) and writes its part of gx
// (overwritten) in the given layout. Requires gx_layout.channel == 1 or pixel == 1.
void conv2d_input_grad(const ConvGradShape& s, int64_t tasks, int64_t gy_task, int64_t w_task,
                       const InputGradLayout& gx_layout, const float* gy, const float* w, float* gx);

}  // namespace neuronml_fast::cpu
