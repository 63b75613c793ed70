// CUDA implementations of the safebn ops: argument checks, dtype dispatch and
// kernel launches, op for op the counterpart of cpu/batch_norm_cpu.cpp (which
// defines the semantics). Kernels live in kernels.cuh, their launch shapes in
// launch.cuh. Nothing here waits for the device: every result, the guard's
// decisions and counters included, is written by kernels on the current stream.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../checks.h"
#include "../composite.h"
#include "../guard_args.h"
#include "../layout.h"
#include "kernels.cuh"
#include "launches.cuh"

namespace safebn {
namespace cuda {
namespace {

// Input dtypes, with the accumulate type of each (float32; float64 for
// float64), which is also accumulate_type() of checks.h.
#define SAFEBN_DISPATCH_INPUT(TYPE, NAME, ...)                                \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] { \
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;                   \
    __VA_ARGS__();                                                            \
  })

// ---- arguments ---------------------------------------------------------------

void check_on_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "the input is on ", input.device(),
              " while other arguments are on a CUDA device. Move the module and the input to the same device.");
}

void check_forward_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias) {
  check_input(input);
  check_channel_tensor(weight, input, "weight");
  check_channel_tensor(bias, input, "bias");
  check_on_cuda(input);
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---- the guard ------------------------------------------------------------------

// The guarded update (guard.h) with given statistics, as a one-block kernel.
// Nothing to do without running buffers or counters.
void launch_update(const RunningBuffers& buffers, const std::optional<at::Tensor>& counters, const at::Tensor& mean_arg,
                   const at::Tensor& invstd_arg, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, int64_t count, bool single_sample, double eps,
                   std::optional<double> momentum) {
  if (!buffers.mean.defined() && !counters.has_value()) return;
  AT_DISPATCH_FLOATING_TYPES(mean_arg.scalar_type(), "safebn_update_running_stats", [&] {
    using acc_t = scalar_t;
    const ChannelValues<acc_t> mean(mean_arg), invstd(invstd_arg), w(weight), b(bias);
    update_running_stats_kernel<acc_t><<<1, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        update_args(buffers, counters, mean, invstd, w, b, mean_arg.numel(), count, single_sample, eps, momentum));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The eval check (guard.h) as a one-block kernel.
void launch_check(const at::Tensor& counters, const at::Tensor& running_mean, const at::Tensor& running_var,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  AT_DISPATCH_FLOATING_TYPES(accumulate_type(running_var.scalar_type()), "safebn_check_running_stats", [&] {
    using acc_t = scalar_t;
    const ChannelValues<acc_t> mean(running_mean), var(running_var), w(weight), b(bias);
    check_running_stats_kernel<acc_t><<<1, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        eval_check_args(counters, mean, var, w, b, running_mean.numel(), eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- forward ops ---------------------------------------------------------------

// A training forward's statistics and output of one (chunk of a) batch with
// values, into `mean`, `invstd` and `output`: two launches, the statistics,
// whose last block applies `update` when asked, then the normalization.
template <typename acc_t, typename scalar_t>
void normalize_into(const at::Tensor& input, const Geometry& g, const ChannelValues<acc_t>& w,
                    const ChannelValues<acc_t>& b, double eps, ActivationArg activation, bool guard,
                    const UpdateArgs<acc_t>& update, at::Tensor output, at::Tensor mean, at::Tensor invstd) {
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  reduce_channels(MomentsOp<acc_t>{mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
                                   /*spread_is_invstd=*/true, acc_t(eps), guard, update},
                  input, g, x, static_cast<const scalar_t*>(nullptr));
  with_fusion(activation, [&](auto fused) {
    map_channels(NormalizeOp<acc_t, decltype(fused)::value>{
                     mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), /*spread_is_var=*/false,
                     acc_t(eps), w.data(), b.data(), activation.kind, acc_t(activation.param), /*check=*/{}},
                 g, x, static_cast<const scalar_t*>(nullptr), output.mutable_data_ptr<scalar_t>());
  });
}

// A whole batch: the statistics' last block runs the guarded update of every
// buffer (two launches in all). A ghost batch norm: two launches per chunk,
// then the whole batch's pooled statistics and the guarded update as a
// one-block kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input_arg, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& counters,
    std::optional<double> momentum, double eps, int64_t activation_code, double activation_param,
    int64_t virtual_batch_size) {
  check_eps(eps);
  TORCH_CHECK_VALUE(virtual_batch_size >= 0, "virtual_batch_size must be >= 0, got ", virtual_batch_size);
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  check_forward_args(input_arg, weight, bias);
  check_training_buffers(input_arg, running_mean, running_var, num_batches_tracked, counters, momentum);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  const int64_t count = values_per_channel(input);
  const bool single_sample = g.batch == 1 && count > 1;
  at::Tensor output = at::empty_like(input);
  const RunningBuffers buffers(running_mean, running_var, num_batches_tracked);
  if (input.numel() == 0) {
    const at::Tensor mean = undefined_channel_stats(input, virtual_batch_size),
                     invstd = undefined_channel_stats(input, virtual_batch_size);
    launch_update(buffers, counters, mean, invstd, weight, bias, count, single_sample, eps, momentum);
    buffers.write_back(running_mean, running_var, num_batches_tracked);
    return {output, mean, invstd};
  }
  at::Tensor mean = channel_stat_tensor(input, virtual_batch_size),
             invstd = channel_stat_tensor(input, virtual_batch_size);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_forward_train", [&] {
    const ChannelValues<acc_t> w(weight), b(bias);
    if (virtual_batch_size <= 0) {
      const ChannelValues<acc_t> mean_values(mean), invstd_values(invstd);
      normalize_into<acc_t, scalar_t>(input, g, w, b, eps, activation,
                                      /*guard=*/buffers.mean.defined() || counters.has_value(),
                                      update_args(buffers, counters, mean_values, invstd_values, w, b, g.channels,
                                                  count, single_sample, eps, momentum),
                                      output, mean, invstd);
      return;
    }
    for (int64_t part = 0; part < mean.size(0); ++part) {
      const at::Tensor slice = chunk_of(input, part, virtual_batch_size);
      normalize_into<acc_t, scalar_t>(slice, geometry_of(slice), w, b, eps, activation, /*guard=*/false, {},
                                      chunk_of(output, part, virtual_batch_size), mean[part], invstd[part]);
    }
    const auto [batch_mean, batch_invstd] = pooled_statistics(mean, invstd, input, virtual_batch_size, eps);
    launch_update(buffers, counters, batch_mean, batch_invstd, weight, bias, count, single_sample, eps, momentum);
  });
  buffers.write_back(running_mean, running_var, num_batches_tracked);
  return {output, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input_arg) {
  check_forward_args(input_arg, std::nullopt, std::nullopt);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  if (input.numel() == 0) return {undefined_channel_stats(input), undefined_channel_stats(input)};
  at::Tensor mean = channel_stat_tensor(input), var = channel_stat_tensor(input);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_batch_stats", [&] {
    reduce_channels(MomentsOp<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
                                     /*spread_is_invstd=*/false, acc_t(0), /*guard=*/false, /*update=*/{}},
                    input, g, input.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr));
  });
  return {mean, var};
}

// y = act((x - mean) * weight * invstd + bias), with invstd given (normalize)
// or derived from a variance (batch_norm_eval, which checks the statistics with
// counters, in block (0, 0), an empty input's too). One launch.
at::Tensor normalize_with(const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& mean_arg,
                          const at::Tensor& spread_arg, bool spread_is_var, double eps,
                          const std::optional<at::Tensor>& counters, ActivationArg activation) {
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  at::Tensor output = at::empty_like(input);
  if (output.numel() == 0) {
    if (counters.has_value()) launch_check(*counters, mean_arg, spread_arg, weight, bias, eps);
    return output;
  }
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_normalize", [&] {
    const ChannelValues<acc_t> mean(mean_arg), spread(spread_arg), w(weight), b(bias);
    const EvalCheckArgs<acc_t> check =
        spread_is_var ? eval_check_args(counters, mean, spread, w, b, g.channels, eps) : EvalCheckArgs<acc_t>{};
    with_fusion(activation, [&](auto fused) {
      map_channels(NormalizeOp<acc_t, decltype(fused)::value>{mean.data(), spread.data(), spread_is_var, acc_t(eps),
                                                              w.data(), b.data(), activation.kind,
                                                              acc_t(activation.param), check},
                   g, input.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                   output.mutable_data_ptr<scalar_t>());
    });
  });
  return output;
}

at::Tensor normalize(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
                     int64_t activation, double activation_param) {
  check_forward_args(input, weight, bias);
  check_channel_tensor(mean, input, "mean");
  check_channel_tensor(invstd, input, "invstd");
  return normalize_with(input, weight, bias, mean, invstd, /*spread_is_var=*/false, /*eps=*/0, std::nullopt,
                        activation_arg(activation, activation_param));
}

at::Tensor batch_norm_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, const std::optional<at::Tensor>& counters, double eps,
                           int64_t activation, double activation_param) {
  check_eps(eps);
  check_forward_args(input, weight, bias);
  check_channel_tensor(running_mean, input, "running_mean");
  check_channel_tensor(running_var, input, "running_var");
  check_counters(counters, input.device());
  return normalize_with(input, weight, bias, running_mean, running_var, /*spread_is_var=*/true, eps, counters,
                        activation_arg(activation, activation_param));
}

// ---- backward ops ----------------------------------------------------------------

void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& mean) {
  check_forward_args(input, weight, bias);
  check_channel_tensor(mean, input, "mean");
  check_grad_output(grad_output, input);
}

// grad_output in the input's dtype and exactly the input's layout.
at::Tensor grad_in_layout_of(const at::Tensor& grad_output, const at::Tensor& input) {
  return with_layout_of(grad_output.to(input.scalar_type()), input);
}

// sum(dz) and sum(dz * (x - mean)) per channel into sum_dy and sum_dy_xmu
// (and sum(dz * xhat) into grad_weight when defined), dz = dy * act'(z).
template <typename acc_t, typename scalar_t>
void launch_grad_sums(const at::Tensor& input, const Geometry& g, const scalar_t* dy, const scalar_t* x,
                      const ChannelValues<acc_t>& mean, const ChannelValues<acc_t>& invstd,
                      const ChannelValues<acc_t>& w, const ChannelValues<acc_t>& b, ActivationArg activation,
                      acc_t* sum_dy, acc_t* sum_dy_xmu, acc_t* grad_weight) {
  with_fusion(activation, [&](auto fused) {
    reduce_channels(GradSumsOp<acc_t, decltype(fused)::value>{mean.data(), sum_dy, sum_dy_xmu, invstd.data(),
                                                              grad_weight, w.data(), b.data(), activation.kind,
                                                              acc_t(activation.param)},
                    input, g, dy, x);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_arg, const at::Tensor& invstd_arg, bool train,
    std::array<bool, 3> output_mask, int64_t activation_code, double activation_param, int64_t virtual_batch_size) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  TORCH_CHECK_VALUE(virtual_batch_size >= 0, "virtual_batch_size must be >= 0, got ", virtual_batch_size);
  check_forward_args(input_arg, weight, bias);
  check_statistics(mean_arg, input_arg, virtual_batch_size, "mean");
  check_statistics(invstd_arg, input_arg, virtual_batch_size, "invstd");
  check_grad_output(grad_output, input_arg);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor dy = grad_in_layout_of(grad_output, input);
  const Geometry g = geometry_of(input);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool want_input = output_mask[0], want_weight = output_mask[1] && has_weight, want_bias = output_mask[2];
  const at::TensorOptions stats_options = input.options().dtype(accumulate_type(input.scalar_type()));
  at::Tensor grad_input = want_input ? at::empty_like(input) : at::Tensor();
  // sum(dy * xhat) and sum(dy) per channel, a ghost batch norm's summed over
  // its chunks (each with its invstd)
  at::Tensor grad_weight, grad_bias;
  if (input.numel() == 0) {  // as on the CPU: zero parameter gradients, not 0 * NaN
    grad_weight = at::zeros({g.channels}, stats_options);
    grad_bias = at::zeros({g.channels}, stats_options);
  } else {
    SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward", [&] {
      const ChannelValues<acc_t> w(weight), b(bias);
      for (int64_t part = 0; part < chunk_count(input.size(0), virtual_batch_size); ++part) {
        const at::Tensor x_part = chunk_of(input, part, virtual_batch_size), dy_part = chunk_of(dy, part, virtual_batch_size);
        const Geometry part_geometry = geometry_of(x_part);
        const ChannelValues<acc_t> mean(virtual_batch_size > 0 ? mean_arg[part] : mean_arg),
            invstd(virtual_batch_size > 0 ? invstd_arg[part] : invstd_arg);
        const scalar_t* dy_data = dy_part.const_data_ptr<scalar_t>();
        const scalar_t* x = x_part.const_data_ptr<scalar_t>();
        at::Tensor sum_dy, sum_dy_xmu;
        // Eval mode without parameter gradients needs no reduction at all.
        if (want_weight || want_bias || (want_input && train)) {
          sum_dy = at::empty({g.channels}, stats_options);
          sum_dy_xmu = at::empty({g.channels}, stats_options);
          at::Tensor part_grad_weight = want_weight ? at::empty({g.channels}, stats_options) : at::Tensor();
          launch_grad_sums(x_part, part_geometry, dy_data, x, mean, invstd, w, b, activation,
                           sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(),
                           want_weight ? part_grad_weight.mutable_data_ptr<acc_t>() : nullptr);
          // out of place: sum_dy is read by this chunk's input gradient, queued after
          grad_weight = part == 0 || !want_weight ? part_grad_weight : grad_weight + part_grad_weight;
          grad_bias = part == 0 ? sum_dy : grad_bias + sum_dy;
        }
        if (want_input) {
          with_fusion(activation, [&](auto fused) {
            map_channels(GradInputOp<acc_t, decltype(fused)::value>{
                             mean.data(), invstd.data(), w.data(), b.data(), data_or_null<acc_t>(sum_dy),
                             data_or_null<acc_t>(sum_dy_xmu), acc_t(part_geometry.per_channel()), train,
                             activation.kind, acc_t(activation.param)},
                         part_geometry, dy_data, x,
                         chunk_of(grad_input, part, virtual_batch_size).mutable_data_ptr<scalar_t>());
          });
        }
      }
    });
  }
  // Parameter gradients in the weight's dtype (a no-op for float32 weights), the
  // statistics' without a weight (F.batch_norm takes a bias alone).
  const at::ScalarType param_type = has_weight ? weight->scalar_type() : accumulate_type(input.scalar_type());
  return {grad_input, want_weight ? grad_weight.to(param_type) : at::Tensor(),
          want_bias ? grad_bias.to(param_type) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input_arg, const at::Tensor& mean_arg,
    const at::Tensor& invstd_arg, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    std::array<bool, 2> param_mask, int64_t activation_code, double activation_param) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  check_backward_args(grad_output, input_arg, weight, bias, mean_arg);
  check_channel_tensor(invstd_arg, input_arg, "invstd");
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor dy = grad_in_layout_of(grad_output, input);
  const Geometry g = geometry_of(input);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool want_weight = param_mask[0] && has_weight;
  // sum(dz) and sum(dz * (x - mean)) as rows of one tensor, all-reduced as
  // one; as on the CPU, a batch without values has zero sums and gradients.
  const bool no_values = input.numel() == 0;
  const at::TensorOptions stats_options = input.options().dtype(accumulate_type(input.scalar_type()));
  const auto stats = [&](at::IntArrayRef sizes) {
    return no_values ? at::zeros(sizes, stats_options) : at::empty(sizes, stats_options);
  };
  at::Tensor sums = stats({2, g.channels});
  at::Tensor grad_weight = want_weight ? stats({g.channels}) : at::Tensor();
  if (!no_values) {
    SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward_reduce", [&] {
      const ChannelValues<acc_t> mean(mean_arg), invstd(invstd_arg), w(weight), b(bias);
      acc_t* out = sums.mutable_data_ptr<acc_t>();
      launch_grad_sums(input, g, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), mean, invstd, w, b,
                       activation, out, out + g.channels,
                       want_weight ? grad_weight.mutable_data_ptr<acc_t>() : nullptr);
    });
  }
  // In the weight's dtype, the statistics' without a weight (a copy: an op's
  // outputs do not alias each other).
  const at::ScalarType param_type = has_weight ? weight->scalar_type() : sums.scalar_type();
  return {sums, want_weight ? grad_weight.to(param_type) : at::Tensor(),
          param_mask[1] ? sums[0].to(param_type, /*non_blocking=*/false, /*copy=*/true) : at::Tensor()};
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input_arg,
                          const std::optional<at::Tensor>& weight, const at::Tensor& mean_arg,
                          const at::Tensor& invstd_arg, const at::Tensor& sums_arg, int64_t count,
                          const std::optional<at::Tensor>& bias, int64_t activation_code, double activation_param) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  check_backward_args(grad_output, input_arg, weight, bias, mean_arg);
  check_channel_tensor(invstd_arg, input_arg, "invstd");
  check_grad_sums(sums_arg, input_arg);
  TORCH_CHECK_VALUE(count > 0, "count (values per channel over every process) must be > 0, got ", count);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor dy = grad_in_layout_of(grad_output, input);
  const Geometry g = geometry_of(input);
  at::Tensor grad_input = at::empty_like(input);
  if (grad_input.numel() == 0) return grad_input;
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward_elemt", [&] {
    const ChannelValues<acc_t> mean(mean_arg), invstd(invstd_arg), w(weight), b(bias), sums(sums_arg);
    with_fusion(activation, [&](auto fused) {
      map_channels(GradInputOp<acc_t, decltype(fused)::value>{mean.data(), invstd.data(), w.data(), b.data(),
                                                              sums.data(), sums.data() + g.channels, acc_t(count),
                                                              /*train=*/true, activation.kind,
                                                              acc_t(activation.param)},
                   g, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                   grad_input.mutable_data_ptr<scalar_t>());
    });
  });
  return grad_input;
}

// ---- the split ops' guard ----------------------------------------------------------

void update_running_stats(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<at::Tensor>& counters, const at::Tensor& mean,
                          const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, int64_t count, double eps,
                          std::optional<double> momentum, bool single_sample) {
  TORCH_CHECK(mean.is_cuda(), "the batch mean is on ", mean.device(),
              " while other arguments are on a CUDA device. Keep the statistics on the module's device.");
  check_update_tensors(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias,
                       momentum);
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const RunningBuffers buffers(running_mean, running_var, num_batches_tracked);
  launch_update(buffers, counters, mean, invstd, weight, bias, count, single_sample, eps, momentum);
  buffers.write_back(running_mean, running_var, num_batches_tracked);
}

void check_running_stats(const at::Tensor& counters, const at::Tensor& running_mean, const at::Tensor& running_var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         double eps) {
  check_running_stats_args(counters, running_mean, running_var, weight, bias, eps);
  const c10::cuda::CUDAGuard device_guard(running_mean.device());
  launch_check(counters, running_mean, running_var, weight, bias, eps);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(safebn, CUDA, m) {
  m.impl("forward_train", &cuda::forward_train);
  m.impl("batch_norm_eval", &cuda::batch_norm_eval);
  m.impl("backward", &cuda::backward);
  m.impl("batch_stats", &cuda::batch_stats);
  m.impl("normalize", &cuda::normalize);
  m.impl("backward_reduce", &cuda::backward_reduce);
  m.impl("backward_elemt", &cuda::backward_elemt);
  m.impl("update_running_stats", &cuda::update_running_stats);
  m.impl("check_running_stats", &cuda::check_running_stats);
}

}  // namespace safebn
