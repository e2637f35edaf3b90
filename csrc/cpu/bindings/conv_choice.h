// Which implementation computes the dense core of a masked convolution on the CPU: the package's
// AVX2 gradient kernels (csrc/cpu/conv_grad.h) or oneDNN through ATen, as one grouped call over
// the tasks or one call per task.
//
// Why measured: no fixed rule is right on every CPU, shape, active count and thread count (the
// own weight gradient beats oneDNN's by up to 1.7x on a narrow compact layer and loses on a wide
// one; oneDNN's grouped backward is slow for many large groups, its per-task calls pay a launch
// each). So each case (its shapes, active-count bucket, dtype, threads, convolution parameters,
// the gradients asked for) is timed once at its first use, every candidate on the call's own
// tensors, and the fastest remembered for the rest of the process. Every candidate computes the
// same gradients (exact within float rounding), so the choice never changes a result's meaning.
//
// The policy: NEURONML_FAST_CPU_CONV=auto (the default: measured) | own | onednn (restrict the
// candidates; among several left, the fastest is still measured) | onednn-grouped |
// onednn-per-task (one candidate, for tests). `set_conv_policy` overrides the variable.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace neuronml_fast::cpu::bindings {

enum class ConvImpl : int { kOwn = 0, kOneDnnGrouped = 1, kOneDnnPerTask = 2 };

const char* conv_impl_name(ConvImpl impl);

// The policy's name ("auto", "own", ...): set_conv_policy's, else NEURONML_FAST_CPU_CONV's, else "auto".
std::string conv_policy();

// Throws (naming the argument) on an unknown name; "" goes back to the environment's policy.
void set_conv_policy(const std::string& name);

// Whether the policy admits `impl`.
bool conv_policy_allows(ConvImpl impl);

using ChoiceKey = std::vector<int64_t>;
using Candidate = std::pair<ConvImpl, std::function<void()>>;

// The candidate to run for `key`: the only one the policy leaves, else the remembered winner,
// else the fastest now (each admitted candidate runs once to warm up, then is timed
// kTimedRuns times, least time counts), remembered. `candidates` lists what the call can run
// (at least oneDNN's grouped form); the policy filters them, falling back to the grouped oneDNN
// call where it leaves none (own kernels unavailable for this dtype or shape). Thread-safe.
ConvImpl choose_conv_impl(const ChoiceKey& key, const std::vector<Candidate>& candidates);

// The remembered choices, {key: impl}, and forgetting them (tests, and a user who changed threads
// mid-process without wanting the old measurements).
std::vector<std::pair<ChoiceKey, ConvImpl>> conv_choices();
void clear_conv_choices();

// Active count -> its bucket in the key: eighths of the channels (rounded up), so a layer whose
// mask changes every step is measured a few times, not once per count.
int64_t active_bucket(int64_t active, int64_t channels);

}  // namespace neuronml_fast::cpu::bindings
