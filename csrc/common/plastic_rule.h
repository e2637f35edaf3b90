// The plastic trace rules' codes, for the CPU and CUDA kernels and both bindings. Framework-free.
// Python: neuronml_fast/ops/plastic/rules.py (HEBB, OJA, MODULATED), which the Triton kernels and
// every launcher use; a test checks that both extensions export these same values.
#pragma once

namespace neuronml_fast {

enum class PlasticRule : int { kHebb = 0, kOja = 1, kModulated = 2 };

}  // namespace neuronml_fast
