#include "cpu/bindings/conv_choice.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>

namespace neuronml_fast::cpu::bindings {
namespace {

// Runs per candidate after its warm-up; the least time counts (a neighbour's load only adds).
constexpr int kTimedRuns = 4;

const char* const kPolicies[] = {"auto", "own", "onednn", "onednn-grouped", "onednn-per-task"};

bool known_policy(const std::string& name) {
  return std::find(std::begin(kPolicies), std::end(kPolicies), name) != std::end(kPolicies);
}

struct State {
  std::mutex mutex;
  std::string policy_override;  // "" = the environment's
  std::map<ChoiceKey, ConvImpl> choices;
};

State& state() {
  static State* s = new State();  // never destroyed: used from threads that may outlive statics
  return *s;
}

std::string environment_policy() {
  const char* value = std::getenv("NEURONML_FAST_CPU_CONV");
  if (value == nullptr || *value == '\0') return "auto";
  const std::string name(value);
  TORCH_CHECK(known_policy(name), "NEURONML_FAST_CPU_CONV: expected auto, own, onednn, onednn-grouped or "
              "onednn-per-task, got '", name, "'");
  return name;
}

bool policy_allows(const std::string& policy, ConvImpl impl) {
  if (policy == "auto") return true;
  if (policy == "own") return impl == ConvImpl::kOwn;
  if (policy == "onednn") return impl != ConvImpl::kOwn;
  if (policy == "onednn-grouped") return impl == ConvImpl::kOneDnnGrouped;
  return impl == ConvImpl::kOneDnnPerTask;
}

double seconds_of(const std::function<void()>& run) {
  const auto start = std::chrono::steady_clock::now();
  run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Interleaved rounds (A B C, A B C, ...): a neighbour's load that comes and goes during the
// measurement hits every candidate alike.
// What choose_conv_impl appends to a call's key: the policy's hash and the admitted candidates.
constexpr std::ptrdiff_t kKeySuffix = 2;

ConvImpl fastest(const std::vector<const Candidate*>& admitted) {
  for (const Candidate* c : admitted) c->second();  // warm-up: first-touch pages, oneDNN's primitive cache
  std::vector<double> least(admitted.size(), std::numeric_limits<double>::infinity());
  for (int r = 0; r < kTimedRuns; ++r)
    for (size_t i = 0; i < admitted.size(); ++i) least[i] = std::min(least[i], seconds_of(admitted[i]->second));
  const size_t best = std::min_element(least.begin(), least.end()) - least.begin();
  return admitted[best]->first;
}

}  // namespace

const char* conv_impl_name(ConvImpl impl) {
  switch (impl) {
    case ConvImpl::kOwn: return "own";
    case ConvImpl::kOneDnnGrouped: return "onednn-grouped";
    case ConvImpl::kOneDnnPerTask: return "onednn-per-task";
  }
  return "?";
}

std::string conv_policy() {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    if (!state().policy_override.empty()) return state().policy_override;
  }
  return environment_policy();
}

void set_conv_policy(const std::string& name) {
  TORCH_CHECK(name.empty() || known_policy(name), "policy: expected '', auto, own, onednn, onednn-grouped or "
              "onednn-per-task, got '", name, "'");
  std::lock_guard<std::mutex> lock(state().mutex);
  state().policy_override = name;
}

bool conv_policy_allows(ConvImpl impl) { return policy_allows(conv_policy(), impl); }

ConvImpl choose_conv_impl(const ChoiceKey& key, const std::vector<Candidate>& candidates) {
  const std::string policy = conv_policy();
  std::vector<const Candidate*> admitted;
  for (const Candidate& c : candidates)
    if (policy_allows(policy, c.first)) admitted.push_back(&c);
  if (admitted.empty()) return ConvImpl::kOneDnnGrouped;  // the one form every case has
  if (admitted.size() == 1) return admitted.front()->first;
  // The key ends with the policy and the candidates admitted: a winner measured while the own
  // kernels were in use (vector ISA, policy) is never replayed where they are not.
  int64_t admitted_set = 0;
  for (const Candidate* c : admitted) admitted_set |= int64_t{1} << static_cast<int>(c->first);
  ChoiceKey full_key = key;
  full_key.push_back(static_cast<int64_t>(std::hash<std::string>{}(policy)));
  full_key.push_back(admitted_set);
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    const auto found = state().choices.find(full_key);
    if (found != state().choices.end()) return found->second;
  }
  // Timed outside the lock: the candidates run ATen's own threads. Two threads meeting a new
  // case at once both measure it; the first to finish decides.
  const ConvImpl winner = fastest(admitted);
  std::lock_guard<std::mutex> lock(state().mutex);
  return state().choices.try_emplace(full_key, winner).first->second;
}

std::vector<std::pair<ChoiceKey, ConvImpl>> conv_choices() {
  std::lock_guard<std::mutex> lock(state().mutex);
  std::vector<std::pair<ChoiceKey, ConvImpl>> out;
  for (const auto& [key, impl] : state().choices) out.emplace_back(ChoiceKey(key.begin(), key.end() - kKeySuffix), impl);
  return out;
}

void clear_conv_choices() {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().choices.clear();
}

int64_t active_bucket(int64_t active, int64_t channels) {
  if (channels <= 0) return 0;
  return (8 * active + channels - 1) / channels;
}

}  // namespace neuronml_fast::cpu::bindings
