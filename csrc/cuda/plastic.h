// Hebbian plasticity on CUDA (SPEC section 4): the whole time loop in the kernels, behind the
// launchers of neuronml_fast/ops/plastic/gpu.py (the same buffers as the Triton kernels in
// kernels/plastic.py). A call is three launches: the forward, the reverse walk, and the reduction
// of the reverse walk's partial sums (with the weight and bias gradients). Framework-free;
// bindings.cpp validates tensors and calls in. Every dtype: the inputs, the parameters, the output
// and the parameters' gradients in the caller's, the trace and everything the kernels accumulate
// or read back in the accumulation type (float for float16 and bfloat16: a 16-bit trace would
// round away the small Hebbian increments it adds up over hundreds of steps).
//
// Each sequence is `parts` blocks. One part: the block walks every row of its sequence, and the
// forward may keep the trace in shared memory (`resident`). Several parts: a cooperative launch
// (every block resident at once) whose blocks split the sequence's rows (and, in the reverse
// walk's column pass, its columns) and meet at a grid barrier between a step's phases, so a
// large layer of a few sequences streams its trace through every multiprocessor, not one.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common/plastic_rule.h"
#include "cuda/sensitivity.h"  // DType

namespace neuronml_fast::cuda {

constexpr int kPlasticThreads = 256;  // 8 warps: a warp per row, a thread per column
constexpr int kPlasticReduceTile = 16;  // the reduction's [16, 16] tile of the weight gradient

struct PlasticShape {
  int64_t T, B, OUT, IN, every;  // steps, sequences, features, steps between checkpoints
  double clip;                   // the trace's bound (has_clip)
  PlasticRule rule;
  bool recurrent, per_neuron, endogenous, mod_tanh, tanh, alpha_scalar, has_clip;
  bool recompute;  // the reverse walk recomputes segments from checkpoints (clip, identity) instead of reconstructing
};

struct PlasticPlan {
  int64_t parts;  // blocks per sequence (> 1: a cooperative launch)
  bool resident;  // parts == 1: the forward keeps the trace in shared memory
};

// The plan for a shape on the current device. requested_parts 0 and requested_resident -1 choose:
// resident when the trace fits in shared memory; else, when the sequences alone leave
// multiprocessors idle and the device runs cooperative launches, as many parts as keep every
// multiprocessor busy (at most one warp's row each). Requests that cannot run (a resident trace
// too large, a grid the device cannot hold at once) are cudaErrorInvalidValue.
cudaError_t plastic_plan(DType dtype, const PlasticShape& s, int64_t requested_parts, int requested_resident,
                         PlasticPlan* plan);

// Pointers: null where absent. In the accumulation type: hebb, trace, state, checkpoints, activity,
// the backward's output (the forward's state), hebb_final, grad_hebb_in, the scratch buffers
// (trace, segment, grad_z, grad_pre, mod_rows), grad_hebb and the partial sums; everything else in
// the caller's type. Where the two types are the same, state is output, grad_z_out grad_z and
// grad_pre_out grad_pre.
struct PlasticForwardArgs {
  const void *x, *weight, *alpha, *eta, *bias, *drive, *y0, *modulation, *hebb, *mod_weight, *mod_bias, *mod_fanout;
  void *trace, *output, *checkpoints, *activity;  // [B, OUT, IN], [T, B, OUT], [ceil(T / every), B, OUT, IN], [T, B]
  void* state;  // [T, B, OUT]: the output in the accumulation type, which the kernels read back
};

struct PlasticBackwardArgs {
  const void *x, *weight, *alpha, *eta, *y0, *output, *grad_output, *modulation, *activity, *mod_weight, *mod_fanout,
      *checkpoints, *hebb_final, *grad_hebb_in;
  void *trace, *segment;  // scratch: [B, OUT, IN] (reconstructing), [min(every, T), B, OUT, IN] (recomputing)
  void *grad_hebb, *grad_z, *grad_pre;  // [B, OUT, IN], [T, B, OUT], [T, B, IN] (linear) or [B, OUT] (rnn: dL/dy0)
  void *grad_z_out, *grad_pre_out;  // grad_z and grad_pre in the caller's type
  void *grad_mod, *mod_rows;  // like the given modulation; [B, OUT] scratch (modulated)
  // partial sums: alpha [B, OUT, IN] or [B * parts], eta [B * parts], the modulator's [B, OUT], [B], [B, OUT]
  void *alpha_part, *eta_part, *mod_weight_part, *mod_bias_part, *mod_fanout_part;
};

struct PlasticReduceArgs {
  const void *x, *y0, *output, *grad_z, *alpha_part, *eta_part, *mod_weight_part, *mod_bias_part, *mod_fanout_part;
  void *grad_weight, *grad_bias, *grad_alpha, *grad_eta, *grad_mod_weight, *grad_mod_bias, *grad_mod_fanout;
};

// The forward: trace (and the checkpoints H_0, H_every, ...), output and the modulator's activity.
cudaError_t plastic_forward(DType dtype, const PlasticShape& s, const PlasticForwardArgs& a, const PlasticPlan& plan,
                            cudaStream_t stream);

// The reverse walk (T >= 1): dL/dH_0, dL/dz, dL/dpre, the modulation's gradient and the partial sums.
cudaError_t plastic_backward(DType dtype, const PlasticShape& s, const PlasticBackwardArgs& a,
                             const PlasticPlan& plan, cudaStream_t stream);

// The sums over (t, b) (weight, bias) and over the sequences' parts (alpha, eta, the modulator's).
cudaError_t plastic_reduce(DType dtype, const PlasticShape& s, const PlasticReduceArgs& a, int64_t parts,
                           cudaStream_t stream);

}  // namespace neuronml_fast::cuda
