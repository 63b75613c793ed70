// CPU implementations of the safebn ops: dtype dispatch, the split of work
// across threads, and the per-channel bookkeeping around kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "../guard.h"
#include "kernels.h"

namespace safebn {
namespace {

// The kernels' storage type for each ATen scalar type.
template <typename scalar_t> struct Storage { using type = scalar_t; };
template <> struct Storage<c10::BFloat16> { using type = cpu::bf16; };
template <> struct Storage<c10::Half> { using type = cpu::f16; };

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// A per-channel tensor as a vector of acc_t; `fill` stands in for a missing one.
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t, int64_t channels, acc_t fill) {
  if (!t.has_value() || !t->defined()) return std::vector<acc_t>(channels, fill);
  const at::Tensor v = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = v.const_data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + channels);
}

// How a contiguous-layout pass is split: one task per channel while there are
// enough channels to keep every thread busy (the channel then stays in cache
// between the reduction and the elementwise pass), otherwise several tasks per
// channel over slices of its plane.
struct PlaneSplit {
  int64_t slices;       // tasks per channel
  int64_t slice_len;    // plane indices per task
  bool fused() const { return slices == 1; }
};

PlaneSplit split_planes(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_channel = g.per_channel();
  if (g.channels >= 4 * threads || per_channel < 4096) return {1, per_channel};
  const int64_t slices = std::min(at::divup(4 * threads, g.channels), at::divup(per_channel, int64_t(4096)));
  return {slices, at::divup(per_channel, slices)};
}

// Channels-last passes split the rows into one contiguous range per task.
int64_t row_tasks(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min(threads, g.rows() / 64));
}

template <typename Fn>
void for_each_slice(const Geometry& g, const PlaneSplit& split, Fn fn) {
  at::parallel_for(0, g.channels * split.slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / split.slices, slice = task % split.slices;
      const int64_t lo = slice * split.slice_len;
      fn(c, lo, std::min(lo + split.slice_len, g.per_channel()));
    }
  });
}

template <typename Fn>
void for_each_row_range(const Geometry& g, Fn fn) {
  const int64_t tasks = row_tasks(g), rows = at::divup(g.rows(), tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      fn(task, task * rows, std::min((task + 1) * rows, g.rows()));
  });
}

template <typename acc_t>
struct ChannelStats {
  std::vector<acc_t> mean, invstd;
};

template <typename T, typename acc_t>
void normalize(const T* x, T* y, const Geometry& g, const acc_t* mean, const acc_t* scale,
               const acc_t* bias) {
  const auto& k = cpu::kernels<T>();
  if (g.channels_last) {
    for_each_row_range(g, [&](int64_t, int64_t lo, int64_t hi) {
      k.rows_normalize(x, y, g.channels, lo, hi, mean, scale, bias);
    });
  } else {
    for_each_slice(g, split_planes(g), [&](int64_t c, int64_t lo, int64_t hi) {
      k.plane_normalize(x, y, g, c, lo, hi, mean[c], scale[c], bias[c]);
    });
  }
}

// Batch statistics, and the output when `y` is given. Contiguous inputs with
// many channels normalize each channel right after reducing it, while it is
// still in cache.
template <typename T, typename acc_t>
void train_forward(const T* x, T* y, const Geometry& g, acc_t eps, const std::vector<acc_t>& weight,
                   const std::vector<acc_t>& bias, acc_t* mean, acc_t* invstd) {
  const auto& k = cpu::kernels<T>();
  const int64_t C = g.channels;
  std::vector<acc_t> scale(C);
  auto finish_channel = [&](int64_t c, const Welford<acc_t>& w) {
    mean[c] = w.mean;
    invstd[c] = invstd_from_var(w.variance(), eps);
    scale[c] = weight[c] * invstd[c];
  };
  if (!g.channels_last) {
    const PlaneSplit split = split_planes(g);
    if (split.fused()) {
      at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          finish_channel(c, k.plane_stats(x, g, c, 0, g.per_channel()));
          k.plane_normalize(x, y, g, c, 0, g.per_channel(), mean[c], scale[c], bias[c]);
        }
      });
      return;
    }
    std::vector<Welford<acc_t>> partial(C * split.slices);
    for_each_slice(g, split, [&](int64_t c, int64_t lo, int64_t hi) {
      partial[c * split.slices + lo / split.slice_len] = k.plane_stats(x, g, c, lo, hi);
    });
    for (int64_t c = 0; c < C; ++c) {
      Welford<acc_t> total;
      for (int64_t s = 0; s < split.slices; ++s) total.merge(partial[c * split.slices + s]);
      finish_channel(c, total);
    }
  } else {
    std::vector<Welford<acc_t>> partial(row_tasks(g) * C);
    for_each_row_range(g, [&](int64_t task, int64_t lo, int64_t hi) {
      k.rows_stats(x, C, lo, hi, partial.data() + task * C);
    });
    for (int64_t c = 0; c < C; ++c) {
      Welford<acc_t> total;
      for (int64_t t = 0; t < row_tasks(g); ++t) total.merge(partial[t * C + c]);
      finish_channel(c, total);
    }
  }
  normalize(x, y, g, mean, scale.data(), bias.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_input(input_arg);
  check_channel_tensor(weight, input_arg, "weight");
  check_channel_tensor(bias, input_arg, "bias");
  check_eps(eps);
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  at::Tensor output = at::empty_like(input);
  const auto acc = accumulate_type(input.scalar_type());
  at::Tensor mean = at::empty({g.channels}, input.options().dtype(acc));
  at::Tensor invstd = at::empty({g.channels}, input.options().dtype(acc));
  if (g.per_channel() == 0) {  // nothing to normalize; the statistics are undefined
    mean.fill_(NAN);
    invstd.fill_(NAN);
    return {output, mean, invstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "safebn_forward_train", [&] {
    using T = typename Storage<scalar_t>::type;
    using acc_t = cpu::acc_type<T>;
    train_forward<T, acc_t>(data_of<T>(input), mutable_data_of<T>(output), g, acc_t(eps),
                            channel_values<acc_t>(weight, g.channels, 1),
                            channel_values<acc_t>(bias, g.channels, 0),
                            mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>());
  });
  return {output, mean, invstd};
}

at::Tensor forward_eval(const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps) {
  check_input(input_arg);
  check_channel_tensor(weight, input_arg, "weight");
  check_channel_tensor(bias, input_arg, "bias");
  check_channel_tensor(running_mean, input_arg, "running_mean");
  check_channel_tensor(running_var, input_arg, "running_var");
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  at::Tensor output = at::empty_like(input);
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "safebn_forward_eval", [&] {
    using T = typename Storage<scalar_t>::type;
    using acc_t = cpu::acc_type<T>;
    const std::vector<acc_t> w = channel_values<acc_t>(weight, g.channels, 1);
    const std::vector<acc_t> mean = channel_values<acc_t>(running_mean, g.channels, 0);
    const std::vector<acc_t> var = channel_values<acc_t>(running_var, g.channels, 0);
    std::vector<acc_t> scale(g.channels);
    for (int64_t c = 0; c < g.channels; ++c) scale[c] = w[c] * invstd_from_var(var[c], acc_t(eps));
    normalize(data_of<T>(input), mutable_data_of<T>(output), g, mean.data(), scale.data(),
              channel_values<acc_t>(bias, g.channels, 0).data());
  });
  return output;
}

template <typename acc_t>
std::vector<GradInputCoefficients<acc_t>> coefficients(
    const std::vector<acc_t>& mean, const std::vector<acc_t>& invstd, const std::vector<acc_t>& weight,
    const std::vector<double>& sum_dy, const std::vector<double>& sum_dy_xmu, int64_t count, bool train) {
  std::vector<GradInputCoefficients<acc_t>> k(mean.size());
  for (size_t c = 0; c < k.size(); ++c)
    k[c] = grad_input_coefficients<acc_t>(mean[c], invstd[c], weight[c], acc_t(sum_dy[c]),
                                          acc_t(sum_dy_xmu[c]), acc_t(count), train);
  return k;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output_arg, const at::Tensor& input_arg,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean_arg,
    const at::Tensor& invstd_arg, bool train, std::array<bool, 3> output_mask) {
  check_input(input_arg);
  check_channel_tensor(weight, input_arg, "weight");
  check_channel_tensor(mean_arg, input_arg, "mean");
  check_channel_tensor(invstd_arg, input_arg, "invstd");
  TORCH_CHECK(grad_output_arg.sizes() == input_arg.sizes(), "grad_output has shape ",
              grad_output_arg.sizes(), " but the input has shape ", input_arg.sizes());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor grad_output = with_layout_of(grad_output_arg.to(input.scalar_type()), input);
  const Geometry g = geometry_of(input);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool want_input = output_mask[0], want_weight = output_mask[1] && has_weight,
             want_bias = output_mask[2] && has_weight;
  const bool want_sums = (want_input && train) || want_weight || want_bias;

  at::Tensor grad_input = want_input ? at::empty_like(input) : at::Tensor();
  std::vector<double> sum_dy(g.channels, 0.0), sum_dy_xmu(g.channels, 0.0);
  if (g.per_channel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "safebn_backward", [&] {
      using T = typename Storage<scalar_t>::type;
      using acc_t = cpu::acc_type<T>;
      const auto& k = cpu::kernels<T>();
      const T* dy = data_of<T>(grad_output);
      const T* x = data_of<T>(input);
      T* dx = want_input ? mutable_data_of<T>(grad_input) : nullptr;
      const std::vector<acc_t> mean = channel_values<acc_t>(mean_arg, g.channels, 0);
      const std::vector<acc_t> invstd = channel_values<acc_t>(invstd_arg, g.channels, 0);
      const std::vector<acc_t> w = channel_values<acc_t>(weight, g.channels, 1);
      const int64_t count = g.per_channel();
      if (!g.channels_last) {
        const PlaneSplit split = split_planes(g);
        if (split.fused()) {  // reduce and write each channel while it is in cache
          at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
            for (int64_t c = begin; c < end; ++c) {
              if (want_sums) k.plane_grad_sums(dy, x, g, c, 0, count, mean[c], &sum_dy[c], &sum_dy_xmu[c]);
              if (!want_input) continue;
              const auto kc = grad_input_coefficients<acc_t>(mean[c], invstd[c], w[c], acc_t(sum_dy[c]),
                                                             acc_t(sum_dy_xmu[c]), acc_t(count), train);
              k.plane_grad_input(dy, x, dx, g, c, 0, count, kc);
            }
          });
        } else {
          if (want_sums) {
            std::vector<double> partial_dy(g.channels * split.slices, 0.0), partial_dyx(partial_dy.size(), 0.0);
            for_each_slice(g, split, [&](int64_t c, int64_t lo, int64_t hi) {
              const int64_t slot = c * split.slices + lo / split.slice_len;
              k.plane_grad_sums(dy, x, g, c, lo, hi, mean[c], &partial_dy[slot], &partial_dyx[slot]);
            });
            for (int64_t c = 0; c < g.channels; ++c)
              for (int64_t s = 0; s < split.slices; ++s) {
                sum_dy[c] += partial_dy[c * split.slices + s];
                sum_dy_xmu[c] += partial_dyx[c * split.slices + s];
              }
          }
          if (want_input) {
            const auto kc = coefficients(mean, invstd, w, sum_dy, sum_dy_xmu, count, train);
            for_each_slice(g, split, [&](int64_t c, int64_t lo, int64_t hi) {
              k.plane_grad_input(dy, x, dx, g, c, lo, hi, kc[c]);
            });
          }
        }
      } else {
        if (want_sums) {
          const int64_t tasks = row_tasks(g);
          std::vector<double> partial_dy(tasks * g.channels, 0.0), partial_dyx(partial_dy.size(), 0.0);
          for_each_row_range(g, [&](int64_t task, int64_t lo, int64_t hi) {
            k.rows_grad_sums(dy, x, g.channels, lo, hi, mean.data(), partial_dy.data() + task * g.channels,
                             partial_dyx.data() + task * g.channels);
          });
          for (int64_t t = 0; t < tasks; ++t)
            for (int64_t c = 0; c < g.channels; ++c) {
              sum_dy[c] += partial_dy[t * g.channels + c];
              sum_dy_xmu[c] += partial_dyx[t * g.channels + c];
            }
        }
        if (want_input) {
          const auto kc = coefficients(mean, invstd, w, sum_dy, sum_dy_xmu, count, train);
          for_each_row_range(g, [&](int64_t, int64_t lo, int64_t hi) {
            k.rows_grad_input(dy, x, dx, g.channels, lo, hi, kc.data());
          });
        }
      }
    });
  }
  at::Tensor grad_weight, grad_bias;
  const auto channel_options = at::TensorOptions().dtype(at::kDouble);
  if (want_weight) {
    at::Tensor dyx = at::from_blob(sum_dy_xmu.data(), {g.channels}, channel_options);
    grad_weight = (dyx * invstd_arg.to(at::kDouble)).to(weight->scalar_type());
  }
  if (want_bias) grad_bias = at::from_blob(sum_dy.data(), {g.channels}, channel_options).to(weight->scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

int64_t* counters_data(const std::optional<at::Tensor>& counters) {
  if (!counters.has_value()) return nullptr;
  TORCH_CHECK(counters->scalar_type() == at::kLong && counters->numel() == kNumCounters &&
                  counters->is_contiguous(),
              "counters must be a contiguous int64 tensor of ", int64_t(kNumCounters), " elements");
  return counters->mutable_data_ptr<int64_t>();
}

template <typename acc_t>
acc_t largest_finite(at::ScalarType type) {
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "largest_finite", [&] {
    value = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return static_cast<acc_t>(std::min<double>(value, std::numeric_limits<acc_t>::max()));
}

void update_running_stats(const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<at::Tensor>& counters, const at::Tensor& mean_arg,
                          const at::Tensor& invstd_arg, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, int64_t count, double eps,
                          std::optional<double> momentum) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must be given together");
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value() || !running_mean.has_value(),
              "momentum=None (a cumulative average) needs num_batches_tracked");
  int64_t* counts = counters_data(counters);
  const bool guarded = counts != nullptr;
  const int64_t channels = mean_arg.numel();
  AT_DISPATCH_FLOATING_TYPES(mean_arg.scalar_type(), "safebn_update_running_stats", [&] {
    using acc_t = scalar_t;
    const std::vector<acc_t> mean = channel_values<acc_t>(mean_arg, channels, 0);
    const std::vector<acc_t> invstd = channel_values<acc_t>(invstd_arg, channels, 0);
    const std::vector<acc_t> w = channel_values<acc_t>(weight, channels, 1);
    const std::vector<acc_t> b = channel_values<acc_t>(bias, channels, 0);
    if (guarded) {
      counts[kBatches] += 1;
      if (count < 2) {  // no variance to learn from zero or one value
        counts[kSkippedUpdates] += 1;
        return;
      }
      ChannelFaults faults;
      for (int64_t c = 0; c < channels; ++c)
        faults.add(training_faults(mean[c], invstd[c], w[c], b[c], acc_t(eps)));
      counts[kLowVarianceChannels] += faults.low_var;
      if (faults.any_nonfinite()) {
        record_nonfinite(counts, faults);
        counts[kSkippedUpdates] += 1;
        return;
      }
    }
    if (!running_mean.has_value()) return;
    int64_t* tracked = num_batches_tracked.has_value() ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr;
    const acc_t factor = momentum.has_value() ? acc_t(*momentum) : acc_t(1) / acc_t(*tracked + 1);
    std::vector<acc_t> new_mean(channels), new_var(channels);
    const std::vector<acc_t> old_mean = channel_values<acc_t>(running_mean, channels, 0);
    const std::vector<acc_t> old_var = channel_values<acc_t>(running_var, channels, 0);
    const acc_t limit = largest_finite<acc_t>(running_mean->scalar_type());
    ChannelFaults overflow;
    for (int64_t c = 0; c < channels; ++c) {
      const RunningUpdate<acc_t> u = running_update(old_mean[c], old_var[c], mean[c], invstd[c], acc_t(eps), count, factor);
      new_mean[c] = u.mean;
      new_var[c] = u.var;
      if (!u.fits(limit)) overflow.var += 1;
    }
    if (guarded && overflow.any_nonfinite()) {  // the update itself would overflow the buffers' dtype
      record_nonfinite(counts, overflow);
      counts[kSkippedUpdates] += 1;
      return;
    }
    running_mean->copy_(at::from_blob(new_mean.data(), {channels}, mean_arg.options().device(at::kCPU)));
    running_var->copy_(at::from_blob(new_var.data(), {channels}, mean_arg.options().device(at::kCPU)));
    if (tracked != nullptr) *tracked += 1;
  });
}

void check_eval_stats(const at::Tensor& counters, const at::Tensor& running_mean,
                      const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps) {
  int64_t* counts = counters_data(counters);
  const int64_t channels = running_mean.numel();
  AT_DISPATCH_FLOATING_TYPES(accumulate_type(running_mean.scalar_type()), "safebn_check_eval_stats", [&] {
    using acc_t = scalar_t;
    const std::vector<acc_t> mean = channel_values<acc_t>(running_mean, channels, 0);
    const std::vector<acc_t> var = channel_values<acc_t>(running_var, channels, 0);
    const std::vector<acc_t> w = channel_values<acc_t>(weight, channels, 1);
    const std::vector<acc_t> b = channel_values<acc_t>(bias, channels, 0);
    ChannelFaults faults;
    for (int64_t c = 0; c < channels; ++c) faults.add(eval_faults(mean[c], var[c], w[c], b[c], acc_t(eps)));
    if (faults.any_nonfinite()) record_nonfinite(counts, faults);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward", &backward);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("check_eval_stats", &check_eval_stats);
}

}  // namespace safebn
