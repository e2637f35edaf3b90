// Hebbian plasticity on the CPU (SPEC section 4). Framework-free: raw pointers and sizes.
//
// Forward: per step, one pass over the trace. Row j of sequence b reads H[b, j, :] once to form
// its pre-activation z_j = sum_i (W + alpha * H)[j, i] pre_i + c_j, applies the activation and
// updates the same row in place: never a materialized W + alpha * H.
//
// Backward: walks time in reverse holding one trace and its gradient. Each trace H_t is
// reconstructed from H_{t+1}: the rules are invertible
//   hebb:  H = (H' - eta post pre) / (1 - eta)      oja: H = (H' - eta post pre) / (1 - eta post^2)
//   modulated: H = H' - M post pre
// Undoing a decay amplifies rounding by 1 / (1 - eta) per step, so the forward also keeps the
// trace every `checkpoint_every` steps (chosen by the caller so the amplification stays below
// 2^8) and the reconstruction restarts from each exact checkpoint. With a clip the update is not
// invertible: the backward recomputes each segment forward from its checkpoint instead.
#pragma once
#include <cstdint>

#include "common/plastic_rule.h"

namespace neuronml_fast::cpu {

using neuronml_fast::PlasticRule;

struct PlasticShape {
  int64_t T, B, OUT, IN;
  bool recurrent;            // pre = y_{t-1} (plastic_rnn, OUT == IN) or x_t (plastic_linear)
  PlasticRule rule;
  bool modulation_per_neuron;  // modulation [T, B, OUT] (else [T, B])
  bool tanh;                 // activation tanh (else identity)
  bool alpha_scalar;         // alpha is one number for all connections
  bool has_clip;
  double clip;
  bool recompute;            // recompute segments from checkpoints instead of undoing updates
                             // (clip: not invertible; identity activation: unbounded activity
                             // makes undoing an update cancel catastrophically)
  int64_t checkpoint_every;  // steps between stored traces (the trace before steps 0, k, 2k, ...)
  bool endogenous;           // modulated rule with M_t computed by a Modulator (rnn only)
};

// Backpropamine's modulator neuron (endogenous modulation, recurrent layers only):
// M_t[b, j] = fanout[j] * act(weight . y_t[b] + bias). The forward writes the modulator's
// activity act(s) [T, B]; the backward reads it back with the per-neuron modulation it implies
// (passed as `modulation`), and writes dL/ds [T, B].
template <typename T>
struct Modulator {
  const T* weight = nullptr;  // [OUT]
  T bias = T(0);
  const T* fanout = nullptr;  // [OUT]
  bool tanh = true;
  T* activity = nullptr;      // [T, B]: written by the forward, read by the backward
  T* grad_s = nullptr;        // [T, B]: written by the backward
};

// x: plastic_linear input [T, B, IN] (pre), or plastic_rnn input [T, B, OUT] (added to z).
// bias [OUT], drive [T, B, OUT], y0 [B, OUT], modulation: may be null when unused.
// hebb [B, OUT, IN]: the initial trace in, the final trace out. output [T, B, OUT].
// checkpoints: [ceil(T / checkpoint_every), B, OUT, IN], the trace before steps 0, k, 2k, ...
template <typename T>
void plastic_forward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* bias,
                     const T* drive, const T* y0, const T* modulation, const Modulator<T>& modulator, T* hebb,
                     T* output, T* checkpoints);

// Gradients. hebb: the final trace (overwritten: it walks back to the initial trace).
// grad_hebb: dL/d(final trace) in (zeros if unused), dL/d(initial trace) out. grad_output [T, B, OUT].
// Outputs: grad_z [T, B, OUT] (dL/d pre-activation: gives grad_weight, grad_bias, grad_drive and the
// rnn input gradient), grad_pre [T, B, IN] (linear: grad_input; rnn: unused, may be null),
// grad_y0 [B, OUT] (rnn), grad_alpha [OUT, IN] (or [1] if scalar), grad_eta [1],
// grad_modulation (shape of modulation). segment: only if `recompute` (clip or identity
// activation), [checkpoint_every, B, OUT, IN] scratch.
template <typename T>
void plastic_backward(const PlasticShape& s, const T* x, const T* weight, const T* alpha, T eta, const T* y0,
                      const T* modulation, const Modulator<T>& modulator, const T* output, const T* grad_output,
                      const T* checkpoints, T* hebb, T* grad_hebb, T* grad_z, T* grad_pre, T* grad_y0,
                      T* grad_alpha, T* grad_eta, T* grad_modulation, T* segment);

}  // namespace neuronml_fast::cpu

// Explicit instantiations of the two kernels for T, in the namespace where it is expanded
// (plastic.cpp: the dispatching entry points; plastic_avx2.cpp: the AVX2 build).
#define NEURONML_FAST_INSTANTIATE_PLASTIC(T)                                                                    \
  template void plastic_forward<T>(const PlasticShape&, const T*, const T*, const T*, T, const T*, const T*,    \
                                   const T*, const T*, const Modulator<T>&, T*, T*, T*);                       \
  template void plastic_backward<T>(const PlasticShape&, const T*, const T*, const T*, T, const T*, const T*,   \
                                    const Modulator<T>&, const T*, const T*, const T*, T*, T*, T*, T*, T*, T*,  \
                                    T*, T*, T*);
