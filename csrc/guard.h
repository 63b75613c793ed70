// The non-finite guard and the running-statistics update, per channel.
// Host+device: the CPU loops and the CUDA kernel apply the same rules.
#pragma once

#include "welford.h"

namespace safebn {

// Slots of the per-module int64 counters tensor. torch_safebn/safety.py names
// them in the same order (Counter); tests/test_ops.py checks the two agree.
enum Counter : int64_t {
  kBatches = 0,           // training batches the update saw
  kSkippedUpdates,        // batches that left the running statistics untouched
  kNonFiniteEvents,       // batches or eval calls with non-finite statistics/parameters
  kDegenerateBatches,     // one value per channel, normalized with running stats
  kSingleSampleBatches,   // N == 1 with more than one value per channel
  kLowVarianceChannels,   // channel-batches whose variance was below eps
  kReportedEvents,        // non-finite events the host has raised or warned about (written by the host)
  // The first non-finite event not yet reported, kept until the host reports
  // it, so that an error names where the trouble began rather than its latest
  // consequence:
  kEventStep,             //   training batches seen before it
  kEventInTraining,       //   1 in a training batch, 0 in an eval call
  kBadMeanChannels,       //   channels at fault: mean, variance (or running_var + eps <= 0),
  kBadVarChannels,
  kBadWeightChannels,     //   weight,
  kBadBiasChannels,       //   bias
  kNumCounters
};

template <typename acc_t>
SAFEBN_HOST_DEVICE bool is_finite(acc_t v) {
  return std::isfinite(v);
}

// What one channel contributes to the decision for the whole batch.
struct ChannelFaults {
  int64_t mean = 0, var = 0, weight = 0, bias = 0, low_var = 0;

  SAFEBN_HOST_DEVICE bool any_nonfinite() const {
    return mean + var + weight + bias > 0;
  }
  SAFEBN_HOST_DEVICE void add(const ChannelFaults& o) {
    mean += o.mean; var += o.var; weight += o.weight; bias += o.bias; low_var += o.low_var;
  }
};

// The new running statistics of one channel. `max_value` is the largest finite
// value of the running buffers' dtype, so that a float16 buffer never receives
// an update that would round to inf.
template <typename acc_t>
struct RunningUpdate {
  acc_t mean;
  acc_t var;
  SAFEBN_HOST_DEVICE bool fits(acc_t max_value) const {
    return is_finite(mean) && is_finite(var) && std::fabs(mean) <= max_value && var <= max_value;
  }
};

template <typename acc_t>
SAFEBN_HOST_DEVICE RunningUpdate<acc_t> running_update(
    acc_t running_mean, acc_t running_var, acc_t batch_mean, acc_t batch_invstd,
    acc_t eps, int64_t count, acc_t factor) {
  const acc_t batch_var = unbiased_var(var_from_invstd(batch_invstd, eps), count);
  return {blend(running_mean, batch_mean, factor), blend(running_var, batch_var, factor)};
}

template <typename acc_t>
SAFEBN_HOST_DEVICE ChannelFaults training_faults(
    acc_t batch_mean, acc_t batch_invstd, acc_t weight, acc_t bias, acc_t eps) {
  ChannelFaults f;
  f.mean = !is_finite(batch_mean);
  // A finite variance gives a finite, positive invstd since eps > 0.
  f.var = !(is_finite(batch_invstd) && batch_invstd > acc_t(0));
  f.weight = !is_finite(weight);
  f.bias = !is_finite(bias);
  f.low_var = !f.var && var_from_invstd(batch_invstd, eps) < eps;
  return f;
}

template <typename acc_t>
SAFEBN_HOST_DEVICE ChannelFaults eval_faults(
    acc_t running_mean, acc_t running_var, acc_t weight, acc_t bias, acc_t eps) {
  ChannelFaults f;
  f.mean = !is_finite(running_mean);
  f.var = !(is_finite(running_var) && running_var + eps > acc_t(0));
  f.weight = !is_finite(weight);
  f.bias = !is_finite(bias);
  return f;
}

// Records a non-finite event, and describes it when it is the first one the
// host has not reported yet. In a training batch, kBatches already counts it.
SAFEBN_HOST_DEVICE void record_nonfinite(int64_t* counters, const ChannelFaults& f, bool training) {
  if (counters[kNonFiniteEvents] == counters[kReportedEvents]) {
    counters[kEventStep] = training ? counters[kBatches] - 1 : counters[kBatches];
    counters[kEventInTraining] = training;
    counters[kBadMeanChannels] = f.mean;
    counters[kBadVarChannels] = f.var;
    counters[kBadWeightChannels] = f.weight;
    counters[kBadBiasChannels] = f.bias;
  }
  counters[kNonFiniteEvents] += 1;
}

}  // namespace safebn
