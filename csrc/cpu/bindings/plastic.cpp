// Bindings of the Hebbian plastic layers (csrc/cpu/plastic.h): the fused forward and the
// backward with trace reconstruction.
#include "cpu/bindings/bindings.h"

#include <algorithm>

#include "cpu/plastic.h"

namespace neuronml_fast::cpu::bindings {
namespace {

using neuronml_fast::cpu::PlasticRule;
using neuronml_fast::cpu::PlasticShape;

const at::Tensor* opt(const c10::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

template <typename scalar_t>
const scalar_t* ptr(const at::Tensor* t) { return t ? t->data_ptr<scalar_t>() : nullptr; }

template <typename scalar_t>
scalar_t* mut(const at::Tensor* t) { return t ? t->data_ptr<scalar_t>() : nullptr; }

void check_plastic(const at::Tensor* t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  if (t == nullptr) return;
  check_cpu_tensor(*t, name, shape, dtype);
}

PlasticShape plastic_shape(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, bool recurrent,
                           int64_t rule, const at::Tensor* modulation, bool tanh, c10::optional<double> clip,
                           int64_t checkpoint_every, bool endogenous) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2, "input, weight: expected [T, B, in] and [out, in], got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(rule >= 0 && rule <= 2, "rule: expected 0 (hebb), 1 (oja) or 2 (modulated), got ", rule);
  PlasticShape s{};
  s.T = x.size(0), s.B = x.size(1), s.OUT = weight.size(0), s.IN = weight.size(1);
  s.recurrent = recurrent;
  TORCH_CHECK(!recurrent || s.OUT == s.IN, "weight: a recurrent layer needs a square weight, got ", weight.sizes());
  TORCH_CHECK(x.size(2) == (recurrent ? s.OUT : s.IN), "input: expected ", recurrent ? s.OUT : s.IN,
              " features, got ", x.size(2));
  s.rule = static_cast<PlasticRule>(rule);
  s.endogenous = endogenous;
  TORCH_CHECK(!endogenous || recurrent, "mod_weight: endogenous modulation needs a recurrent layer");
  TORCH_CHECK((s.rule == PlasticRule::kModulated) == (modulation != nullptr || endogenous),
              "modulation: expected exactly when the rule is modulated");
  s.modulation_per_neuron = modulation != nullptr && modulation->dim() == 3;
  s.tanh = tanh;
  s.alpha_scalar = alpha.dim() == 0;
  s.has_clip = clip.has_value();
  s.clip = clip.value_or(0.0);
  s.recompute = s.has_clip || !tanh;
  s.checkpoint_every = std::max<int64_t>(checkpoint_every, 1);
  const auto dtype = x.scalar_type();
  check_cpu_tensor(x, "input", x.sizes(), dtype);
  check_cpu_tensor(weight, "weight", weight.sizes(), dtype);
  check_cpu_tensor(alpha, "alpha", s.alpha_scalar ? at::IntArrayRef{} : weight.sizes(), dtype);
  if (modulation) {
    check_cpu_tensor(*modulation, "modulation",
               s.modulation_per_neuron ? at::IntArrayRef{s.T, s.B, s.OUT} : at::IntArrayRef{s.T, s.B}, dtype);
  }
  return s;
}

// The modulator's tensors: all of mod_weight [OUT], mod_fanout [OUT] and activity [T, B] (and
// grad_s [T, B] in the backward), or none.
template <typename scalar_t>
neuronml_fast::cpu::Modulator<scalar_t> modulator_of(const PlasticShape& s, const at::Tensor* mod_weight,
                                                     double mod_bias, const at::Tensor* mod_fanout, bool mod_tanh,
                                                     const at::Tensor* activity, const at::Tensor* grad_s) {
  neuronml_fast::cpu::Modulator<scalar_t> m;
  if (!s.endogenous) return m;
  m.weight = ptr<scalar_t>(mod_weight);
  m.bias = static_cast<scalar_t>(mod_bias);
  m.fanout = ptr<scalar_t>(mod_fanout);
  m.tanh = mod_tanh;
  m.activity = mut<scalar_t>(activity);
  m.grad_s = mut<scalar_t>(grad_s);
  return m;
}

void check_modulator(const PlasticShape& s, const at::Tensor* mod_weight, const at::Tensor* mod_fanout,
                     const at::Tensor* activity, at::ScalarType dtype) {
  if (!s.endogenous) return;
  TORCH_CHECK(mod_fanout && activity, "mod_fanout, activity: required with mod_weight");
  check_cpu_tensor(*mod_weight, "mod_weight", {s.OUT}, dtype);
  check_cpu_tensor(*mod_fanout, "mod_fanout", {s.OUT}, dtype);
  check_cpu_tensor(*activity, "activity", {s.T, s.B}, dtype);
}

void plastic_forward_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, double eta,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& drive,
                         const c10::optional<at::Tensor>& y0, const c10::optional<at::Tensor>& modulation,
                         c10::optional<double> clip, bool recurrent, int64_t rule, bool tanh,
                         int64_t checkpoint_every, at::Tensor& hebb, at::Tensor& output,
                         const c10::optional<at::Tensor>& checkpoints, const c10::optional<at::Tensor>& mod_weight,
                         double mod_bias, const c10::optional<at::Tensor>& mod_fanout, bool mod_tanh,
                         const c10::optional<at::Tensor>& activity) {
  const PlasticShape s = plastic_shape(x, weight, alpha, recurrent, rule, opt(modulation), tanh, clip,
                                       checkpoint_every, mod_weight.has_value());
  const auto dtype = x.scalar_type();
  check_modulator(s, opt(mod_weight), opt(mod_fanout), opt(activity), dtype);
  check_plastic(opt(bias), "bias", {s.OUT}, dtype);
  check_plastic(opt(drive), "drive", {s.T, s.B, s.OUT}, dtype);
  check_plastic(opt(y0), "y0", {s.B, s.OUT}, dtype);
  check_cpu_tensor(hebb, "hebb", {s.B, s.OUT, s.IN}, dtype);
  check_cpu_tensor(output, "output", {s.T, s.B, s.OUT}, dtype);
  TORCH_CHECK(checkpoints.has_value(), "checkpoints: required");
  check_cpu_tensor(*checkpoints, "checkpoints", {(s.T + s.checkpoint_every - 1) / s.checkpoint_every, s.B, s.OUT, s.IN},
             dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "plastic_forward", [&] {
    neuronml_fast::cpu::plastic_forward<scalar_t>(
        s, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        static_cast<scalar_t>(eta), ptr<scalar_t>(opt(bias)), ptr<scalar_t>(opt(drive)), ptr<scalar_t>(opt(y0)),
        ptr<scalar_t>(opt(modulation)),
        modulator_of<scalar_t>(s, opt(mod_weight), mod_bias, opt(mod_fanout), mod_tanh, opt(activity), nullptr),
        hebb.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), mut<scalar_t>(opt(checkpoints)));
  });
}

void plastic_backward_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, double eta,
                          const c10::optional<at::Tensor>& y0, const c10::optional<at::Tensor>& modulation,
                          c10::optional<double> clip, bool recurrent, int64_t rule, bool tanh,
                          int64_t checkpoint_every, const at::Tensor& output, const at::Tensor& grad_output,
                          const c10::optional<at::Tensor>& checkpoints, at::Tensor& hebb, at::Tensor& grad_hebb,
                          at::Tensor& grad_z, const c10::optional<at::Tensor>& grad_pre,
                          const c10::optional<at::Tensor>& grad_y0, at::Tensor& grad_alpha, at::Tensor& grad_eta,
                          const c10::optional<at::Tensor>& grad_modulation,
                          const c10::optional<at::Tensor>& segment, const c10::optional<at::Tensor>& mod_weight,
                          const c10::optional<at::Tensor>& mod_fanout, bool mod_tanh,
                          const c10::optional<at::Tensor>& activity, const c10::optional<at::Tensor>& grad_s) {
  const PlasticShape s = plastic_shape(x, weight, alpha, recurrent, rule, opt(modulation), tanh, clip,
                                       checkpoint_every, mod_weight.has_value());
  const auto dtype = x.scalar_type();
  check_modulator(s, opt(mod_weight), opt(mod_fanout), opt(activity), dtype);
  if (s.endogenous) {
    TORCH_CHECK(modulation && modulation->dim() == 3, "modulation: the per-neuron M_t of the modulator's forward");
    TORCH_CHECK(grad_s.has_value(), "grad_s: required with mod_weight");
    check_cpu_tensor(*grad_s, "grad_s", {s.T, s.B}, dtype);
  }
  check_plastic(opt(y0), "y0", {s.B, s.OUT}, dtype);
  check_cpu_tensor(output, "output", {s.T, s.B, s.OUT}, dtype);
  check_cpu_tensor(grad_output, "grad_output", {s.T, s.B, s.OUT}, dtype);
  check_cpu_tensor(hebb, "hebb", {s.B, s.OUT, s.IN}, dtype);
  check_cpu_tensor(grad_hebb, "grad_hebb", {s.B, s.OUT, s.IN}, dtype);
  check_cpu_tensor(grad_z, "grad_z", {s.T, s.B, s.OUT}, dtype);
  TORCH_CHECK(recurrent || grad_pre.has_value(), "grad_pre: required for a plastic_linear backward");
  check_plastic(opt(grad_pre), "grad_pre", {s.T, s.B, s.IN}, dtype);
  check_plastic(opt(grad_y0), "grad_y0", {s.B, s.OUT}, dtype);
  check_cpu_tensor(grad_alpha, "grad_alpha", s.alpha_scalar ? at::IntArrayRef{1} : weight.sizes(), dtype);
  check_cpu_tensor(grad_eta, "grad_eta", {1}, dtype);
  if (grad_modulation) check_cpu_tensor(*grad_modulation, "grad_modulation", modulation->sizes(), dtype);
  TORCH_CHECK(checkpoints.has_value(), "checkpoints: required");
  check_cpu_tensor(*checkpoints, "checkpoints", {(s.T + s.checkpoint_every - 1) / s.checkpoint_every, s.B, s.OUT, s.IN},
             dtype);
  TORCH_CHECK(s.recompute == segment.has_value(),
              "segment: expected exactly when segments are recomputed (clip or identity activation)");
  if (segment) check_cpu_tensor(*segment, "segment", {s.checkpoint_every, s.B, s.OUT, s.IN}, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "plastic_backward", [&] {
    neuronml_fast::cpu::plastic_backward<scalar_t>(
        s, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        static_cast<scalar_t>(eta), ptr<scalar_t>(opt(y0)), ptr<scalar_t>(opt(modulation)),
        modulator_of<scalar_t>(s, opt(mod_weight), 0.0, opt(mod_fanout), mod_tanh, opt(activity), opt(grad_s)),
        output.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), ptr<scalar_t>(opt(checkpoints)),
        hebb.data_ptr<scalar_t>(), grad_hebb.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(),
        mut<scalar_t>(opt(grad_pre)), mut<scalar_t>(opt(grad_y0)), grad_alpha.data_ptr<scalar_t>(),
        grad_eta.data_ptr<scalar_t>(), mut<scalar_t>(opt(grad_modulation)), mut<scalar_t>(opt(segment)));
  });
}

}  // namespace

void bind_plastic(py::module_& m) {
  m.attr("PLASTIC_RULE_CODES") = py::dict(py::arg("hebb") = static_cast<int>(PlasticRule::kHebb),
                                          py::arg("oja") = static_cast<int>(PlasticRule::kOja),
                                          py::arg("modulated") = static_cast<int>(PlasticRule::kModulated));
  m.def("plastic_forward_out", &plastic_forward_out, "fused plastic layer forward (SPEC 4)");
  m.def("plastic_backward_out", &plastic_backward_out, "plastic layer backward with trace reconstruction (SPEC 4)");
}

}  // namespace neuronml_fast::cpu::bindings
