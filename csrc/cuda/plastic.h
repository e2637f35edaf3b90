// Hebbian plasticity on CUDA (SPEC section 4): the step kernels behind the shared time loops of
// neuronml_fast/ops/plastic/gpu.py (same contract as the Triton step kernels in kernels/plastic.py).
// Framework-free; bindings.cpp validates tensors and calls in. float and double only.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common/plastic_rule.h"

namespace neuronml_fast::cuda {

constexpr int kPlasticRowsPerBlock = 8;  // one warp per row
constexpr int64_t kPlasticSequenceMaxN = 128;  // largest OUT and IN of the whole-sequence forward

struct PlasticStep {
  int64_t B, OUT, IN, t;
  bool recurrent, per_neuron, tanh, alpha_scalar, has_clip, has_bias, has_drive;
  PlasticRule rule;
};

// The whole forward of a small layer (OUT, IN <= kPlasticSequenceMaxN, no clip) in one launch:
// one block per sequence, its trace in shared memory for all `steps` steps. Sets *launched to
// false (and launches nothing) when the layer does not qualify or its trace does not fit this
// GPU's shared memory; the caller then runs the step kernels. hebb [B, OUT, IN]: initial trace
// in, final out; checkpoints [ceil(steps / every), B, OUT, IN]: the trace before steps 0, every, ...
// y0 [B, OUT] (rnn, may be null), others as plastic_forward_step. s.t is ignored.
cudaError_t plastic_forward_sequence(bool is_double, const PlasticStep& s, int64_t steps, int64_t every, const void* x,
                                     const void* weight, const void* alpha, const void* eta, const void* bias,
                                     const void* drive, const void* y0, const void* modulation, void* hebb,
                                     void* output, void* checkpoints, bool* launched, cudaStream_t stream);

// One forward step (or, with update_only, only the trace update with post read from output).
// x [T, B, IN or OUT], weight/alpha [OUT, IN] (alpha may be [1]), eta/clip [1] on the device,
// pre [B, IN], modulation [T, B(, OUT)], trace [B, OUT, IN] (accumulation type), output [T, B, OUT].
cudaError_t plastic_forward_step(bool is_double, const PlasticStep& s, const void* x, const void* weight,
                                 const void* alpha, const void* eta, const void* clip, const void* bias,
                                 const void* drive, const void* pre, const void* modulation, void* trace,
                                 void* output, bool update_only, cudaStream_t stream);

// One reverse step; buffers as in neuronml_fast/ops/plastic/gpu.py (all in the accumulation type
// except output / grad_output / weight / alpha / modulation, in the input type).
cudaError_t plastic_backward_step(bool is_double, const PlasticStep& s, const void* weight, const void* alpha,
                                  const void* eta, const void* clip, const void* pre, const void* output,
                                  const void* grad_output, const void* carry, const void* modulation, void* h,
                                  void* grad_trace, void* grad_z, void* gpre_part, void* galpha_part, void* geta_part,
                                  void* gmod_rows, bool reconstruct, cudaStream_t stream);

}  // namespace neuronml_fast::cuda
