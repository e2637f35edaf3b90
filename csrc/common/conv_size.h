// The output size of a convolution along one dimension (torch's formula), for both bindings.
// Framework-free. Python: neuronml_fast/ops/masked/reference.py `conv_output_hw`.
#pragma once
#include <cstdint>

namespace neuronml_fast {

constexpr int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace neuronml_fast
