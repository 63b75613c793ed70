// The guard, written once: what is checked after a training batch and before
// an eval call, in which order, what is counted, and what is written when.
// Host+device: the CPU runs it on one thread (SerialTeam), the CUDA kernels on
// the threads of one block (kernels.cuh, BlockTeam), from the same code.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "contract.h"
#include "welford.h"

namespace safebn {

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
  if (counters[kNonfiniteEvents] == counters[kReportedEvents]) {
    counters[kEventStep] = training ? counters[kBatches] - 1 : counters[kBatches];
    counters[kEventInTraining] = training;
    counters[kBadMeanChannels] = f.mean;
    counters[kBadVarChannels] = f.var;
    counters[kBadWeightChannels] = f.weight;
    counters[kBadBiasChannels] = f.bias;
  }
  counters[kNonfiniteEvents] += 1;
}

// A running buffer's element type. The guard touches C values of it, so a
// switch at run time costs nothing, where a template would double the
// statistics kernels that run the guard as their epilogue.
enum class BufferType : int32_t { kFloat, kDouble, kHalf, kBFloat16 };

template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t load_buffer(const void* data, BufferType type, int64_t i) {
  switch (type) {
    case BufferType::kDouble: return acc_t(static_cast<const double*>(data)[i]);
    case BufferType::kHalf: return acc_t(float(static_cast<const c10::Half*>(data)[i]));
    case BufferType::kBFloat16: return acc_t(float(static_cast<const c10::BFloat16*>(data)[i]));
    default: return acc_t(static_cast<const float*>(data)[i]);
  }
}

template <typename acc_t>
SAFEBN_HOST_DEVICE void store_buffer(void* data, BufferType type, int64_t i, acc_t value) {
  switch (type) {
    case BufferType::kDouble: static_cast<double*>(data)[i] = double(value); break;
    case BufferType::kHalf: static_cast<c10::Half*>(data)[i] = c10::Half(float(value)); break;
    case BufferType::kBFloat16: static_cast<c10::BFloat16*>(data)[i] = c10::BFloat16(float(value)); break;
    default: static_cast<float*>(data)[i] = float(value);
  }
}

// Everything the guarded update after a training batch reads and writes.
// Per-channel values are contiguous acc_t arrays; the running buffers are
// contiguous in their own dtype.
template <typename acc_t>
struct UpdateArgs {
  bool running;                  // false: no running statistics
  void* running_mean;            // (of no channels: nullptr)
  void* running_var;
  BufferType buffer_type;
  int64_t* num_batches_tracked;  // nullptr: not tracked
  int64_t* counters;             // nullptr: unguarded (checks=False), as native
  const acc_t* mean;             // the batch's statistics
  const acc_t* invstd;
  const acc_t* weight;  // nullptr: 1
  const acc_t* bias;    // nullptr: 0
  int64_t channels;
  int64_t count;       // values per channel in the batch
  bool single_sample;  // the batch is one example (N == 1) with count > 1
  acc_t eps;
  bool has_momentum;  // false: cumulative average over num_batches_tracked
  acc_t momentum;
  acc_t limit;  // the largest finite value of the buffers' dtype (as acc_t)
};

// What eval mode's check reads: the statistics it normalizes with, weight and bias.
template <typename acc_t>
struct EvalCheckArgs {
  int64_t* counters;  // nullptr: no check
  const acc_t* running_mean;
  const acc_t* running_var;
  const acc_t* weight;  // nullptr: 1
  const acc_t* bias;    // nullptr: 0
  int64_t channels;
  acc_t eps;
};

template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t value_or(const acc_t* values, int64_t c, acc_t fill) {
  return values != nullptr ? values[c] : fill;
}

// The guard runs once per launch: on the device it is not inlined, so that its
// registers do not weigh on the statistics kernels that run it as their
// epilogue. A team's members may be device-only (kernels.cuh): the templates
// below are instantiated for the host only with SerialTeam.
#if defined(__CUDACC__)
#define SAFEBN_GUARD_FUNCTION __host__ __device__ __noinline__
#define SAFEBN_GUARD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define SAFEBN_GUARD_FUNCTION inline
#define SAFEBN_GUARD_TEMPLATE
#endif

// A team runs the guard: its members visit channels first(), first() +
// stride(), ...; total() sums their faults and returns the sum to every
// member, so that every branch below is taken by the whole team; the leader
// alone writes the counters and num_batches_tracked; sync() waits for every
// member. The CPU's team is its one thread.
struct SerialTeam {
  SAFEBN_HOST_DEVICE int64_t first() const { return 0; }
  SAFEBN_HOST_DEVICE int64_t stride() const { return 1; }
  SAFEBN_HOST_DEVICE ChannelFaults total(const ChannelFaults& f) const { return f; }
  SAFEBN_HOST_DEVICE bool leader() const { return true; }
  SAFEBN_HOST_DEVICE void sync() const {}
};

// The guarded update after a training batch. An empty batch changes no buffer
// (native counts it in num_batches_tracked, which the unguarded update
// reproduces). Guarded, the batch is counted; a batch of one value per
// channel has no variance to learn from; a batch whose statistics, weight or
// bias hold NaN/Inf, or whose update would overflow the buffers' dtype, is
// recorded as a non-finite event and leaves every buffer as it was.
SAFEBN_GUARD_TEMPLATE
template <typename acc_t, typename Team>
SAFEBN_GUARD_FUNCTION void guarded_update(const UpdateArgs<acc_t>& a, const Team& team) {
  const bool leader = team.leader();
  if (a.count == 0) {
    if (leader && a.counters == nullptr && a.running && a.num_batches_tracked != nullptr)
      *a.num_batches_tracked += 1;
    return;
  }
  if (a.counters != nullptr) {
    if (leader) {
      a.counters[kBatches] += 1;
      a.counters[kSingleSampleBatches] += a.single_sample;
    }
    if (a.count < 2) {
      if (leader) a.counters[kSkippedUpdates] += 1;
      return;
    }
    ChannelFaults faults;
    for (int64_t c = team.first(); c < a.channels; c += team.stride())
      faults.add(training_faults(a.mean[c], a.invstd[c], value_or(a.weight, c, acc_t(1)),
                                 value_or(a.bias, c, acc_t(0)), a.eps));
    faults = team.total(faults);
    if (leader) a.counters[kLowVarianceChannels] += faults.low_var;
    if (faults.any_nonfinite()) {
      if (leader) {
        record_nonfinite(a.counters, faults, /*training=*/true);
        a.counters[kSkippedUpdates] += 1;
      }
      return;
    }
  }
  if (!a.running) return;
  const acc_t factor = a.has_momentum ? a.momentum : acc_t(1) / acc_t(*a.num_batches_tracked + 1);
  const auto update = [&](int64_t c) {
    return running_update(load_buffer<acc_t>(a.running_mean, a.buffer_type, c),
                          load_buffer<acc_t>(a.running_var, a.buffer_type, c), a.mean[c], a.invstd[c], a.eps,
                          a.count, factor);
  };
  if (a.counters != nullptr) {
    ChannelFaults overflow;
    for (int64_t c = team.first(); c < a.channels; c += team.stride()) overflow.var += !update(c).fits(a.limit);
    overflow = team.total(overflow);
    if (overflow.any_nonfinite()) {
      if (leader) {
        record_nonfinite(a.counters, overflow, /*training=*/true);
        a.counters[kSkippedUpdates] += 1;
      }
      return;
    }
  }
  // Each channel is read and written by the same member in every loop.
  for (int64_t c = team.first(); c < a.channels; c += team.stride()) {
    const RunningUpdate<acc_t> u = update(c);
    store_buffer(a.running_mean, a.buffer_type, c, u.mean);
    store_buffer(a.running_var, a.buffer_type, c, u.var);
  }
  team.sync();  // every member has read num_batches_tracked (factor) before it changes
  if (leader && a.num_batches_tracked != nullptr) *a.num_batches_tracked += 1;
}

// Eval mode's check of the statistics it normalizes with, and of weight and
// bias: one non-finite event when any is NaN/Inf, or running_var + eps <= 0.
SAFEBN_GUARD_TEMPLATE
template <typename acc_t, typename Team>
SAFEBN_GUARD_FUNCTION void check_eval(const EvalCheckArgs<acc_t>& a, const Team& team) {
  if (a.counters == nullptr) return;
  ChannelFaults faults;
  for (int64_t c = team.first(); c < a.channels; c += team.stride())
    faults.add(eval_faults(a.running_mean[c], a.running_var[c], value_or(a.weight, c, acc_t(1)),
                           value_or(a.bias, c, acc_t(0)), a.eps));
  faults = team.total(faults);
  if (team.leader() && faults.any_nonfinite()) record_nonfinite(a.counters, faults, /*training=*/false);
}

}  // namespace safebn
