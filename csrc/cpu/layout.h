// Layout changes of activations on the CPU. Framework-free.
//
// The CPU masked convolution runs in grouped NHWC (csrc/cpu/masked.h, neuronml_fast/ops/masked/cpu.py):
// a task-batched activation [T, N, C, H, W] is stored as [N, H, W, T, C]. A user's NCHW input is
// copied into it once per call; torch's strided copy does that at about half the copy bandwidth,
// this one in 8 x 8 register transposes.
#pragma once
#include <cstdint>

namespace neuronml_fast::cpu {

// src: [tasks, N, C, S] contiguous (S = H*W pixels), dst: [N, S, tasks, C] contiguous, overwritten.
template <typename T>
void to_grouped_nhwc(const T* src, int64_t tasks, int64_t N, int64_t C, int64_t S, T* dst);

}  // namespace neuronml_fast::cpu
