// CPU implementations of the safebn ops: dtype dispatch, the split of work
// across threads, and the per-channel bookkeeping around kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../activation.h"
#include "../checks.h"
#include "../composite.h"
#include "../guard_args.h"
#include "../layout.h"
#include "kernels.h"
#include "large_buffers.h"
#include "passes.h"

namespace safebn {
namespace {

using namespace cpu_passes;

// The kernels' storage type for each ATen scalar type.
template <typename scalar_t> struct Storage { using type = scalar_t; };
template <> struct Storage<c10::BFloat16> { using type = cpu::bf16; };
template <> struct Storage<c10::Half> { using type = cpu::f16; };

#define SAFEBN_DISPATCH_INPUT(TYPE, NAME, ...)                                              \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] {               \
    using T = typename Storage<scalar_t>::type;                                             \
    using acc_t = cpu::acc_type<T>;                                                         \
    __VA_ARGS__();                                                                          \
  })

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// An output the size of the input. From a megabyte up, at::empty_like would
// be fresh memory every step, faulted in page by page at more than the cost
// of the kernels that write it (large_buffers.h).
// The input is contiguous, channels_last or channels_last_3d (prepare()):
// the output takes its strides.
at::Tensor empty_output_like(const at::Tensor& input) {
  if (input.nbytes() < cpu::LargeBuffers::kMinBytes) return at::empty_like(input);
  return at::detail::empty_strided_generic(input.sizes(), input.strides(), &cpu::LargeBuffers::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), input.scalar_type());
}

struct Prepared {
  at::Tensor input;
  Geometry geometry;
};

// The input in a kernel layout, its geometry, and the checks of the
// arguments every op shares.
Prepared prepare(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias) {
  check_input(input);
  check_channel_tensor(weight, input, "weight");
  check_channel_tensor(bias, input, "bias");
  const at::Tensor laid_out = with_kernel_layout(input);
  return {laid_out, geometry_of(laid_out)};
}

// The output, mean and invstd of a training forward; a ghost batch norm's
// statistics are per chunk ([chunks, C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_with_batch_stats(
    const Prepared& prepared, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, ActivationArg activation, int64_t virtual_batch_size) {
  const auto& [input, g] = prepared;
  at::Tensor output = empty_output_like(input);
  if (input.numel() == 0) {
    return {output, undefined_channel_stats(input, virtual_batch_size),
            undefined_channel_stats(input, virtual_batch_size)};
  }
  at::Tensor mean = channel_stat_tensor(input, virtual_batch_size),
             invstd = channel_stat_tensor(input, virtual_batch_size);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_forward_train", [&] {
    const ChannelValues<acc_t> w(weight, 1), b(bias, 0);
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    const Chunks chunks = chunks_of(g, virtual_batch_size);
    NormalizeParams<acc_t> params(mean.numel(), activation);
    reduce_channels(data_of<T>(input), mutable_data_of<T>(output), chunks, params,
                    [&](int64_t i, int64_t c, const Welford<acc_t>& s) {
                      const int64_t j = i * g.channels + c;  // mean and invstd: [chunks, C] or [C]
                      mean_out[j] = s.mean;
                      invstd_out[j] = invstd_from_var(s.variance(), acc_t(eps));
                      params.set(j, s.mean, w[c] * invstd_out[j], b[c]);
                    });
  });
  return {output, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input_arg) {
  const auto [input, g] = prepare(input_arg, std::nullopt, std::nullopt);
  if (input.numel() == 0) return {undefined_channel_stats(input), undefined_channel_stats(input)};
  at::Tensor mean = channel_stat_tensor(input), var = channel_stat_tensor(input);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_batch_stats", [&] {
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* var_out = var.mutable_data_ptr<acc_t>();
    NormalizeParams<acc_t> unused(0, ActivationArg{});
    reduce_channels<T, acc_t>(data_of<T>(input), nullptr, chunks_of(g), unused,
                              [&](int64_t, int64_t c, const Welford<acc_t>& s) {
      mean_out[c] = s.mean;
      var_out[c] = s.variance();
    });
  });
  return {mean, var};
}

// The constants of y = act((x - mean) * weight * invstd + bias), with invstd
// given, or derived from the variance when `spread_is_var`.
template <typename acc_t>
NormalizeParams<acc_t> normalize_params(int64_t channels, const ChannelValues<acc_t>& w,
                                        const ChannelValues<acc_t>& b, const ChannelValues<acc_t>& mean,
                                        const ChannelValues<acc_t>& spread, bool spread_is_var, double eps,
                                        ActivationArg activation) {
  NormalizeParams<acc_t> params(channels, activation);
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t invstd = spread_is_var ? invstd_from_var(spread[c], acc_t(eps)) : spread[c];
    params.set(c, mean[c], w[c] * invstd, b[c]);
  }
  return params;
}

at::Tensor normalize(const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& mean_arg,
                     const at::Tensor& invstd_arg, int64_t activation_code, double activation_param) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  const auto [input, g] = prepare(input_arg, weight, bias);
  check_channel_tensor(mean_arg, input, "mean");
  check_channel_tensor(invstd_arg, input, "invstd");
  at::Tensor output = empty_output_like(input);
  if (output.numel() == 0) return output;
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_normalize", [&] {
    const ChannelValues<acc_t> w(weight, 1), b(bias, 0), mean(mean_arg), invstd(invstd_arg);
    normalize_all(data_of<T>(input), mutable_data_of<T>(output), chunks_of(g),
                  normalize_params<acc_t>(g.channels, w, b, mean, invstd, /*spread_is_var=*/false, 0, activation));
  });
  return output;
}

// y = act((x - running_mean) * weight / sqrt(running_var + eps) + bias), and,
// with counters, the guard's check of what it normalizes with (an empty
// input's too).
at::Tensor batch_norm_eval(const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, const std::optional<at::Tensor>& counters, double eps,
                           int64_t activation_code, double activation_param) {
  check_eps(eps);
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  const auto [input, g] = prepare(input_arg, weight, bias);
  check_channel_tensor(running_mean, input, "running_mean");
  check_channel_tensor(running_var, input, "running_var");
  check_counters(counters, input.device());
  at::Tensor output = empty_output_like(input);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_batch_norm_eval", [&] {
    const ChannelValues<acc_t> w(weight, 1), b(bias, 0), mean(running_mean), var(running_var);
    check_eval(eval_check_args(counters, mean, var, w, b, g.channels, eps), SerialTeam{});
    if (output.numel() > 0)
      normalize_all(data_of<T>(input), mutable_data_of<T>(output), chunks_of(g),
                    normalize_params<acc_t>(g.channels, w, b, mean, var, /*spread_is_var=*/true, eps, activation));
  });
  return output;
}

Prepared prepare_backward(const at::Tensor& grad_output, const at::Tensor& input_arg,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& mean, at::Tensor* dy) {
  Prepared p = prepare(input_arg, weight, bias);
  check_channel_tensor(mean, input_arg, "mean");
  check_grad_output(grad_output, input_arg);
  *dy = with_layout_of(grad_output.to(p.input.scalar_type()), p.input);
  return p;
}

// grad_weight = sum(dy * xhat) and grad_bias = sum(dy) per channel, in the
// weight's dtype (the statistics' without a weight: F.batch_norm takes a bias
// alone), from their sums in double. Allocated directly, not through the
// dispatcher: these few values are a small op's host cost.
at::Tensor parameter_grad(c10::ArrayRef<double> values, const std::optional<at::Tensor>& weight,
                          at::ScalarType stats_type) {
  const at::ScalarType type = weight.has_value() && weight->defined() ? weight->scalar_type() : stats_type;
  at::Tensor t = at::detail::empty_cpu({int64_t(values.size())}, type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "safebn_parameter_grads", [&] {
    scalar_t* out = t.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) out[c] = static_cast<scalar_t>(values[c]);
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_arg, const at::Tensor& invstd_arg, bool train,
    std::array<bool, 3> output_mask, int64_t activation_code, double activation_param, int64_t virtual_batch_size) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  TORCH_CHECK_VALUE(virtual_batch_size >= 0, "virtual_batch_size must be >= 0, got ", virtual_batch_size);
  at::Tensor dy;
  const Prepared prepared = prepare(input_arg, weight, bias);
  const at::Tensor& input = prepared.input;
  const int64_t C = prepared.geometry.channels;
  check_statistics(mean_arg, input, virtual_batch_size, "mean");
  check_statistics(invstd_arg, input, virtual_batch_size, "invstd");
  check_grad_output(grad_output, input_arg);
  dy = with_layout_of(grad_output.to(input.scalar_type()), input);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool want_input = output_mask[0], want_weight = output_mask[1] && has_weight, want_bias = output_mask[2];
  at::Tensor grad_input = want_input ? empty_output_like(input) : at::Tensor();
  // sum(dy * xhat) and sum(dy) per channel over every chunk, each chunk's with its invstd
  ChannelVector<double> weight_sums(C, 0.0), bias_sums(C, 0.0);
  if (input.numel() > 0) {
    SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward", [&] {
      const Chunks chunks = chunks_of(prepared.geometry, virtual_batch_size);
      // mean and invstd: a row of C per chunk ([chunks, C], or [C] for the whole batch)
      const ChannelValues<acc_t> w(weight, 1), b(bias, 0), mean(mean_arg, 0), invstd(invstd_arg, 0);
      const int64_t stats = int64_t(chunks.size()) * C;
      auto coeffs = [&](int64_t i, int64_t c, const GradSums& s) {
        const int64_t j = i * C + c;
        return grad_input_coefficients<acc_t>(mean[j], invstd[j], w[c], b[c], acc_t(s.dy[j]), acc_t(s.dy_xmu[j]),
                                              acc_t(chunks[i].g.per_channel()), train);
      };
      const T* x = data_of<T>(input);
      T* dx = mutable_data_of<T>(grad_input);
      if (want_weight || want_bias || (want_input && train)) {
        NormalizeParams<acc_t> z(stats, activation);
        for (int64_t j = 0; j < stats; ++j) z.set(j, mean[j], w[j % C] * invstd[j], b[j % C]);
        const GradSums sums = reduce_grads<T, acc_t>(data_of<T>(dy), x, dx, chunks, z, coeffs);
        for (int64_t j = 0; j < stats; ++j) {
          weight_sums[j % C] += sums.dy_xmu[j] * double(invstd[j]);
          bias_sums[j % C] += sums.dy[j];
        }
      } else if (want_input) {  // eval mode without parameter gradients: no reduction needed
        ChannelVector<GradInputCoefficients<acc_t>> k(stats);
        const GradSums none(stats);
        for (int64_t j = 0; j < stats; ++j) k[j] = coeffs(j / C, j % C, none);
        grad_input_all(data_of<T>(dy), x, dx, chunks, k, activation);
      }
    });
  }
  const at::ScalarType stats_type = accumulate_type(input.scalar_type());
  return {grad_input, want_weight ? parameter_grad(weight_sums, weight, stats_type) : at::Tensor(),
          want_bias ? parameter_grad(bias_sums, weight, stats_type) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input_arg, const at::Tensor& mean_arg,
    const at::Tensor& invstd_arg, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    std::array<bool, 2> param_mask, int64_t activation_code, double activation_param) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  at::Tensor dy;
  const auto [input, g] = prepare_backward(grad_output, input_arg, weight, bias, mean_arg, &dy);
  check_channel_tensor(invstd_arg, input, "invstd");
  GradSums sums(g.channels);
  ChannelVector<double> weight_sums(g.channels, 0.0);
  const at::ScalarType stats_type = accumulate_type(input.scalar_type());
  // sum(dz) and sum(dz * (x - mean)) as rows of one tensor, all-reduced as one
  at::Tensor out = at::detail::empty_cpu({2, g.channels}, stats_type);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward_reduce", [&] {
    if (input.numel() > 0) {
      const ChannelValues<acc_t> mean(mean_arg), invstd(invstd_arg), w(weight, 1), b(bias, 0);
      NormalizeParams<acc_t> z(g.channels, activation);
      for (int64_t c = 0; c < g.channels; ++c) z.set(c, mean[c], w[c] * invstd[c], b[c]);
      sums = reduce_grads<T, acc_t>(data_of<T>(dy), data_of<T>(input), nullptr, chunks_of(g), z,
                                    [](int64_t, int64_t, const GradSums&) { return GradInputCoefficients<acc_t>{}; });
      // as backward's: no values, a zero gradient, not 0 * invstd
      for (int64_t c = 0; c < g.channels; ++c) weight_sums[c] = sums.dy_xmu[c] * double(invstd[c]);
    }
    acc_t* out_sums = out.mutable_data_ptr<acc_t>();
    std::copy(sums.dy.begin(), sums.dy.end(), out_sums);  // rounded as .to() would
    std::copy(sums.dy_xmu.begin(), sums.dy_xmu.end(), out_sums + g.channels);
  });
  const bool want_weight = param_mask[0] && weight.has_value() && weight->defined();
  return {out, want_weight ? parameter_grad(weight_sums, weight, stats_type) : at::Tensor(),
          param_mask[1] ? parameter_grad(sums.dy, weight, stats_type) : at::Tensor()};
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input_arg,
                          const std::optional<at::Tensor>& weight, const at::Tensor& mean_arg,
                          const at::Tensor& invstd_arg, const at::Tensor& sums_arg, int64_t count,
                          const std::optional<at::Tensor>& bias, int64_t activation_code, double activation_param) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  at::Tensor dy;
  const auto [input, g] = prepare_backward(grad_output, input_arg, weight, bias, mean_arg, &dy);
  check_channel_tensor(invstd_arg, input, "invstd");
  check_grad_sums(sums_arg, input);
  TORCH_CHECK_VALUE(count > 0, "count (values per channel over every process) must be > 0, got ", count);
  at::Tensor grad_input = empty_output_like(input);
  if (grad_input.numel() == 0) return grad_input;
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward_elemt", [&] {
    const ChannelValues<acc_t> mean(mean_arg, 0), invstd(invstd_arg, 0), w(weight, 1), b(bias, 0), sums(sums_arg, 0);
    ChannelVector<GradInputCoefficients<acc_t>> k(g.channels);
    for (int64_t c = 0; c < g.channels; ++c)
      k[c] = grad_input_coefficients<acc_t>(mean[c], invstd[c], w[c], b[c], sums[c], sums[g.channels + c],
                                            acc_t(count), true);
    grad_input_all(data_of<T>(dy), data_of<T>(input), mutable_data_of<T>(grad_input), chunks_of(g), k,
                   activation);
  });
  return grad_input;
}

// The guard (guard.h) after a training batch of `count` values per channel
// (the group's, for SafeSyncBatchNorm) with statistics `mean` and `invstd`.
void update_after_batch(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                        const std::optional<at::Tensor>& num_batches_tracked,
                        const std::optional<at::Tensor>& counters, const at::Tensor& mean_arg,
                        const at::Tensor& invstd_arg, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t count, double eps,
                        std::optional<double> momentum, bool single_sample) {
  const RunningBuffers buffers(running_mean, running_var, num_batches_tracked);
  AT_DISPATCH_FLOATING_TYPES(mean_arg.scalar_type(), "safebn_update_running_stats", [&] {
    using acc_t = scalar_t;
    const ChannelValues<acc_t> mean(mean_arg), invstd(invstd_arg), w(weight), b(bias);
    guarded_update(update_args(buffers, counters, mean, invstd, w, b, mean_arg.numel(), count, single_sample, eps,
                               momentum),
                   SerialTeam{});
  });
  buffers.write_back(running_mean, running_var, num_batches_tracked);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input_arg, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& counters,
    std::optional<double> momentum, double eps, int64_t activation, double activation_param,
    int64_t virtual_batch_size) {
  check_eps(eps);
  TORCH_CHECK_VALUE(virtual_batch_size >= 0, "virtual_batch_size must be >= 0, got ", virtual_batch_size);
  const Prepared prepared = prepare(input_arg, weight, bias);
  check_training_buffers(prepared.input, running_mean, running_var, num_batches_tracked, counters, momentum);
  auto [output, mean, invstd] = normalize_with_batch_stats(prepared, weight, bias, eps,
                                                           activation_arg(activation, activation_param),
                                                           virtual_batch_size);
  const int64_t count = values_per_channel(prepared.input);
  // the running statistics learn from the whole batch: its chunks' statistics pooled
  const auto [batch_mean, batch_invstd] = virtual_batch_size > 0 && count > 0
                                              ? pooled_statistics(mean, invstd, prepared.input, virtual_batch_size, eps)
                                              : std::make_tuple(mean, invstd);
  update_after_batch(running_mean, running_var, num_batches_tracked, counters, batch_mean, batch_invstd, weight, bias,
                     count, eps, momentum, /*single_sample=*/prepared.geometry.batch == 1 && count > 1);
  return {output, mean, invstd};
}

void update_running_stats(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<at::Tensor>& counters, const at::Tensor& mean,
                          const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, int64_t count, double eps,
                          std::optional<double> momentum, bool single_sample) {
  check_update_tensors(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias,
                       momentum);
  update_after_batch(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count,
                     eps, momentum, single_sample);
}

void check_running_stats(const at::Tensor& counters, const at::Tensor& running_mean, const at::Tensor& running_var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         double eps) {
  check_running_stats_args(counters, running_mean, running_var, weight, bias, eps);
  AT_DISPATCH_FLOATING_TYPES(accumulate_type(running_var.scalar_type()), "safebn_check_running_stats", [&] {
    using acc_t = scalar_t;
    const ChannelValues<acc_t> mean(running_mean), var(running_var), w(weight), b(bias);
    check_eval(eval_check_args(counters, mean, var, w, b, running_mean.numel(), eps), SerialTeam{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("backward", &backward);
  m.impl("batch_stats", &batch_stats);
  m.impl("normalize", &normalize);
  m.impl("backward_reduce", &backward_reduce);
  m.impl("backward_elemt", &backward_elemt);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("check_running_stats", &check_running_stats);
}

}  // namespace safebn
