// The C++ CPU extension, neuronml_fast._C_cpu: one module, its functions bound by op family.
#include "cpu/bindings/bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace bindings = neuronml_fast::cpu::bindings;
  m.doc() = "neuronml_fast C++ CPU kernels";
  bindings::bind_runtime(m);
  bindings::bind_sensitivity(m);
  bindings::bind_plastic(m);
  bindings::bind_masked(m);
  bindings::bind_conv(m);
  bindings::bind_batch_norm(m);
}
