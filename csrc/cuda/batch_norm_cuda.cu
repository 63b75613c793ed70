// CUDA implementations of the safebn ops: argument checks, dtype dispatch and
// kernel launches, op for op the counterpart of cpu/batch_norm_cpu.cpp (which
// defines the semantics). Kernels live in kernels.cuh, their launch shapes in
// launch.cuh. Nothing here waits for the device: every result, the guard's
// decisions and counters included, is written by kernels on the current stream.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
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
#include "../guard.h"
#include "kernels.cuh"

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

// A per-channel tensor as a contiguous tensor of acc_t on the device (the
// tensor itself when it already is one); undefined when absent.
at::Tensor channel_values(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? t->to(acc).contiguous() : at::Tensor();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// ---- launches ----------------------------------------------------------------

// Whether the tensors can be read and written in 16-byte Packs: the runs the
// kernels walk (S values per (n, c), or the C channels of a row) hold whole
// Packs and every pointer is 16-byte aligned (a sliced view may not be).
bool packable(const Geometry& g, int pack_width, std::initializer_list<const void*> data) {
  const int64_t run = g.channels_last ? g.channels : g.spatial;
  if (run % pack_width != 0) return false;
  for (const void* p : data)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kPackBytes != 0) return false;
  return true;
}

// Where a reduction's blocks leave their partial totals when each channel is
// split over `splits` blocks; undefined with one split, when every block
// finishes its channels itself. The caching allocator keeps the memory valid
// for the kernels queued on this stream after it is freed.
template <typename State>
at::Tensor partials_for(int64_t splits, int64_t channels, const at::TensorOptions& options) {
  return splits > 1 ? at::empty({splits * channels * int64_t(sizeof(State))}, options.dtype(at::kByte)) : at::Tensor();
}

template <typename State>
State* partials_data(const at::Tensor& partials) {
  return partials.defined() ? static_cast<State*>(partials.mutable_data_ptr()) : nullptr;
}

// The arrival counters of a reduction over `tiles` tiles (kernels.cuh,
// GridCounters). A stream runs its kernels in order and each leaves them
// zero, so one set per device and stream serves every launch on it: they are
// zeroed when made or grown, not per call.
GridCounters grid_counters(int64_t tiles, cudaStream_t stream) {
  struct Counters {
    at::Tensor memory;
    int64_t tiles = 0;
  };
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, cudaStream_t>, Counters> by_stream;
  const c10::DeviceIndex device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  Counters& counters = by_stream[{device, stream}];
  if (counters.tiles < tiles) {
    counters.tiles = std::max<int64_t>({tiles, 2 * counters.tiles, 1024});
    counters.memory = at::zeros({counters.tiles + 1}, at::TensorOptions(at::kInt).device(at::kCUDA, device));
  }
  auto* memory = static_cast<unsigned int*>(counters.memory.mutable_data_ptr());
  return {memory, memory + counters.tiles};
}

template <typename Op, typename scalar_t, int V>
void launch_reduce(const Op& op, const Geometry& g, const scalar_t* in0, const scalar_t* in1,
                   const at::TensorOptions& options) {
  using State = typename Op::State;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    const auto kernel = rows_reduce_kernel<Op, scalar_t, V>;
    const RowsLaunch l = rows_launch(g, V, resident_blocks(kernel));
    const at::Tensor partials = partials_for<State>(l.grid.y, g.channels, options);
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, l.shape, partials_data<State>(partials),
                                           grid_counters(l.grid.x, stream));
  } else {
    const auto kernel = plane_reduce_kernel<Op, scalar_t, V>;
    const PlaneLaunch l = plane_launch(g, V, resident_blocks(kernel));
    const at::Tensor partials = partials_for<State>(l.grid.y, g.channels, options);
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, l.shape, partials_data<State>(partials),
                                           grid_counters(l.grid.x, stream));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op, typename scalar_t, int V>
void launch_map(const Op& op, const Geometry& g, const scalar_t* in0, const scalar_t* in1, scalar_t* out) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    const auto kernel = rows_map_kernel<Op, scalar_t, V>;
    const RowsLaunch l = rows_launch(g, V, resident_blocks(kernel));
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, out, l.shape);
  } else {
    const auto kernel = plane_map_kernel<Op, scalar_t, V>;
    const PlaneLaunch l = plane_launch(g, V, resident_blocks(kernel));
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, out, l.shape);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(std::true_type{}) for an activation to fuse, fn(std::false_type{})
// for none: the kFused parameter of the elementwise ops (kernels.cuh).
template <typename Fn>
void with_fusion(const ActivationArg& activation, Fn fn) {
  if (activation.kind == Activation::kIdentity)
    fn(std::false_type{});
  else
    fn(std::true_type{});
}

// Per-channel reduction of `in0` (and `in1` for two-input ops) into op.finish.
// The input must be non-empty and in a kernel layout.
template <typename Op, typename scalar_t>
void reduce_channels(const Op& op, const at::Tensor& input, const Geometry& g, const scalar_t* in0,
                     const scalar_t* in1) {
  constexpr int V = kPackBytes / sizeof(scalar_t);
  if (packable(g, V, {in0, in1}))
    launch_reduce<Op, scalar_t, V>(op, g, in0, in1, input.options());
  else
    launch_reduce<Op, scalar_t, 1>(op, g, in0, in1, input.options());
}

// out = op.apply(channel constants, in0[, in1]) elementwise, out laid out as the input.
template <typename Op, typename scalar_t>
void map_channels(const Op& op, const Geometry& g, const scalar_t* in0, const scalar_t* in1, scalar_t* out) {
  constexpr int V = kPackBytes / sizeof(scalar_t);
  if (packable(g, V, {in0, in1, out}))
    launch_map<Op, scalar_t, V>(op, g, in0, in1, out);
  else
    launch_map<Op, scalar_t, 1>(op, g, in0, in1, out);
}

// ---- the guard's arguments ---------------------------------------------------

BufferType buffer_type(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return BufferType::kDouble;
    case at::kHalf: return BufferType::kHalf;
    case at::kBFloat16: return BufferType::kBFloat16;
    case at::kFloat: return BufferType::kFloat;
    default: TORCH_CHECK(false, "running statistics must be float32, float64, float16 or bfloat16, got ", type);
  }
}

// The running buffers the kernels update in place: each as it is, or a
// contiguous copy (same dtype) that write_back() returns to it.
struct RunningBuffers {
  at::Tensor mean, var;

  RunningBuffers(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var)
      : mean(running_mean.has_value() ? running_mean->contiguous() : at::Tensor()),
        var(running_var.has_value() ? running_var->contiguous() : at::Tensor()) {}

  void write_back(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) const {
    if (running_mean.has_value() && !mean.is_same(*running_mean)) running_mean->copy_(mean);
    if (running_var.has_value() && !var.is_same(*running_var)) running_var->copy_(var);
  }
};

// The guarded update after a training batch of `count` > 0 values per
// channel with statistics `mean` and `invstd` (written by then, or by the
// same launch before its epilogue), for kernels.cuh's guarded_update.
// `weight` and `bias` are contiguous in acc_t (channel_values).
template <typename acc_t>
RunningStatsArgs<acc_t> running_stats_args(const RunningBuffers& buffers,
                                           const std::optional<at::Tensor>& num_batches_tracked,
                                           const std::optional<at::Tensor>& counters, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight,
                                           const at::Tensor& bias, int64_t count, bool single_sample, double eps,
                                           std::optional<double> momentum) {
  const bool has_buffers = buffers.mean.defined();
  return {/*enabled=*/has_buffers || counters.has_value(),
          has_buffers ? buffers.mean.mutable_data_ptr() : nullptr,
          has_buffers ? buffers.var.mutable_data_ptr() : nullptr,
          buffer_type(has_buffers ? buffers.mean.scalar_type() : mean.scalar_type()),
          num_batches_tracked.has_value() ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr,
          counters_data(counters),
          mean.const_data_ptr<acc_t>(),
          invstd.const_data_ptr<acc_t>(),
          data_or_null<acc_t>(weight),
          data_or_null<acc_t>(bias),
          mean.numel(),
          count,
          single_sample,
          acc_t(eps),
          momentum.has_value(),
          acc_t(momentum.value_or(0)),
          largest_finite<acc_t>(has_buffers ? buffers.mean.scalar_type() : mean.scalar_type())};
}

// An empty batch changes no buffer; native counts it in num_batches_tracked,
// which the unguarded update reproduces.
void count_empty_batch(const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& counters) {
  if (!counters.has_value() && running_mean.has_value() && num_batches_tracked.has_value())
    num_batches_tracked->add_(1);
}

// ---- forward ops ---------------------------------------------------------------

// Two launches: the statistics, whose last block applies the guarded update
// of every buffer; then the normalization.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input_arg, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& counters,
    std::optional<double> momentum, double eps, int64_t activation_code, double activation_param) {
  check_eps(eps);
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  check_forward_args(input_arg, weight, bias);
  check_training_buffers(input_arg, running_mean, running_var, num_batches_tracked, counters, momentum);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  at::Tensor output = at::empty_like(input);
  if (input.numel() == 0) {
    if (g.channels > 0) count_empty_batch(running_mean, num_batches_tracked, counters);
    return {output, undefined_channel_stats(input), undefined_channel_stats(input)};
  }
  at::Tensor mean = channel_stat_tensor(input), invstd = channel_stat_tensor(input);
  const RunningBuffers buffers(running_mean, running_var);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_forward_train", [&] {
    const at::Tensor w = channel_values(weight, mean.scalar_type()), b = channel_values(bias, mean.scalar_type());
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t count = g.per_channel();
    reduce_channels(MomentsOp<acc_t>{mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
                                     /*spread_is_invstd=*/true, acc_t(eps),
                                     running_stats_args<acc_t>(buffers, num_batches_tracked, counters, mean, invstd,
                                                               w, b, count, g.batch == 1 && count > 1, eps,
                                                               momentum)},
                    input, g, x, static_cast<const scalar_t*>(nullptr));
    with_fusion(activation, [&](auto fused) {
      map_channels(NormalizeOp<acc_t, decltype(fused)::value>{
                       mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), /*spread_is_var=*/false,
                       acc_t(eps), data_or_null<acc_t>(w), data_or_null<acc_t>(b), activation.kind,
                       acc_t(activation.param), /*counters=*/nullptr, g.channels},
                   g, x, static_cast<const scalar_t*>(nullptr), output.mutable_data_ptr<scalar_t>());
    });
  });
  buffers.write_back(running_mean, running_var);
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
                                     /*spread_is_invstd=*/false, acc_t(0), /*update=*/{}},
                    input, g, input.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr));
  });
  return {mean, var};
}

// y = (x - mean) * weight * invstd + bias, with invstd given (normalize) or
// derived from a variance (batch_norm_eval, which checks the statistics with
// counters). One launch.
at::Tensor normalize_with(const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& mean_arg,
                          const at::Tensor& spread_arg, bool spread_is_var, double eps,
                          const std::optional<at::Tensor>& counters, ActivationArg activation) {
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const Geometry g = geometry_of(input);
  at::Tensor output = at::empty_like(input);
  if (output.numel() == 0) return output;
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::Tensor mean = channel_values(mean_arg, acc), spread = channel_values(spread_arg, acc);
  const at::Tensor w = channel_values(weight, acc), b = channel_values(bias, acc);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_normalize", [&] {
    with_fusion(activation, [&](auto fused) {
      map_channels(NormalizeOp<acc_t, decltype(fused)::value>{
                       mean.const_data_ptr<acc_t>(), spread.const_data_ptr<acc_t>(), spread_is_var, acc_t(eps),
                       data_or_null<acc_t>(w), data_or_null<acc_t>(b), activation.kind, acc_t(activation.param),
                       counters_data(counters), g.channels},
                   g, input.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                   output.mutable_data_ptr<scalar_t>());
    });
  });
  return output;
}

at::Tensor normalize(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  check_forward_args(input, weight, bias);
  check_channel_tensor(mean, input, "mean");
  check_channel_tensor(invstd, input, "invstd");
  return normalize_with(input, weight, bias, mean, invstd, /*spread_is_var=*/false, /*eps=*/0, std::nullopt,
                        ActivationArg{});
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
                         const std::optional<at::Tensor>& weight, const at::Tensor& mean) {
  check_forward_args(input, weight, std::nullopt);
  check_channel_tensor(mean, input, "mean");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output has shape ", grad_output.sizes(),
              " but the input has shape ", input.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), "grad_output is on ", grad_output.device(),
              " but the input is on ", input.device(), ".");
}

// grad_output in the input's dtype and exactly the input's layout.
at::Tensor grad_in_layout_of(const at::Tensor& grad_output, const at::Tensor& input) {
  return with_layout_of(grad_output.to(input.scalar_type()), input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input_arg, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_arg, const at::Tensor& invstd_arg, bool train,
    std::array<bool, 3> output_mask, int64_t activation_code, double activation_param) {
  const ActivationArg activation = activation_arg(activation_code, activation_param);
  check_backward_args(grad_output, input_arg, weight, mean_arg);
  check_channel_tensor(bias, input_arg, "bias");
  check_channel_tensor(invstd_arg, input_arg, "invstd");
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor dy = grad_in_layout_of(grad_output, input);
  const Geometry g = geometry_of(input);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool want_input = output_mask[0], want_weight = output_mask[1] && has_weight, want_bias = output_mask[2];
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::Tensor mean = channel_values(mean_arg, acc), invstd = channel_values(invstd_arg, acc);
  const at::Tensor w = channel_values(weight, acc), b = channel_values(bias, acc);
  at::Tensor grad_input = want_input ? at::empty_like(input) : at::Tensor();
  at::Tensor sum_dy, sum_dy_xmu, grad_weight;
  if (input.numel() == 0) {  // as on the CPU: zero sums and zero parameter gradients, not 0 * NaN
    sum_dy = at::zeros({g.channels}, mean.options());
    grad_weight = want_weight ? at::zeros_like(sum_dy) : at::Tensor();
  } else {
    SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward", [&] {
      const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      // Eval mode without parameter gradients needs no reduction at all.
      if (want_weight || want_bias || (want_input && train)) {
        sum_dy = at::empty({g.channels}, mean.options());
        sum_dy_xmu = at::empty({g.channels}, mean.options());
        if (want_weight) grad_weight = at::empty({g.channels}, mean.options());
        with_fusion(activation, [&](auto fused) {
          reduce_channels(GradSumsOp<acc_t, decltype(fused)::value>{
                              mean.const_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
                              sum_dy_xmu.mutable_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                              mutable_data_or_null<acc_t>(grad_weight), data_or_null<acc_t>(w),
                              data_or_null<acc_t>(b), activation.kind, acc_t(activation.param)},
                          input, g, dy_data, x);
        });
      }
      if (want_input) {
        with_fusion(activation, [&](auto fused) {
          map_channels(GradInputOp<acc_t, decltype(fused)::value>{
                           mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
                           data_or_null<acc_t>(b), data_or_null<acc_t>(sum_dy), data_or_null<acc_t>(sum_dy_xmu),
                           acc_t(g.per_channel()), train, activation.kind, acc_t(activation.param)},
                       g, dy_data, x, grad_input.mutable_data_ptr<scalar_t>());
        });
      }
    });
  }
  // Parameter gradients in the weight's dtype (a no-op for float32 weights), the
  // statistics' without a weight (F.batch_norm takes a bias alone).
  const at::ScalarType param_type = has_weight ? weight->scalar_type() : acc;
  return {grad_input, want_weight ? grad_weight.to(param_type) : at::Tensor(),
          want_bias ? sum_dy.to(param_type) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output, const at::Tensor& input_arg,
                                                   const at::Tensor& mean_arg) {
  check_backward_args(grad_output, input_arg, std::nullopt, mean_arg);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor dy = grad_in_layout_of(grad_output, input);
  const Geometry g = geometry_of(input);
  const at::Tensor mean = channel_values(mean_arg, accumulate_type(input.scalar_type()));
  if (input.numel() == 0) return {at::zeros({g.channels}, mean.options()), at::zeros({g.channels}, mean.options())};
  at::Tensor sum_dy = at::empty({g.channels}, mean.options()), sum_dy_xmu = at::empty({g.channels}, mean.options());
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward_reduce", [&] {
    reduce_channels(GradSumsOp<acc_t, false>{mean.const_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
                                      sum_dy_xmu.mutable_data_ptr<acc_t>(), nullptr, nullptr, nullptr, nullptr,
                                      Activation::kIdentity, acc_t(0)},
                    input, g, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>());
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input_arg,
                          const std::optional<at::Tensor>& weight, const at::Tensor& mean_arg,
                          const at::Tensor& invstd_arg, const at::Tensor& sum_dy_arg,
                          const at::Tensor& sum_dy_xmu_arg, int64_t count) {
  check_backward_args(grad_output, input_arg, weight, mean_arg);
  check_channel_tensor(invstd_arg, input_arg, "invstd");
  check_channel_tensor(sum_dy_arg, input_arg, "sum_dy");
  check_channel_tensor(sum_dy_xmu_arg, input_arg, "sum_dy_xmu");
  TORCH_CHECK(count > 0, "count (values per channel over every process) must be > 0, got ", count);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = with_kernel_layout(input_arg);
  const at::Tensor dy = grad_in_layout_of(grad_output, input);
  const Geometry g = geometry_of(input);
  at::Tensor grad_input = at::empty_like(input);
  if (grad_input.numel() == 0) return grad_input;
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::Tensor mean = channel_values(mean_arg, acc), invstd = channel_values(invstd_arg, acc);
  const at::Tensor w = channel_values(weight, acc);
  const at::Tensor sum_dy = channel_values(sum_dy_arg, acc), sum_dy_xmu = channel_values(sum_dy_xmu_arg, acc);
  SAFEBN_DISPATCH_INPUT(input.scalar_type(), "safebn_backward_elemt", [&] {
    map_channels(GradInputOp<acc_t, false>{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                    data_or_null<acc_t>(w), /*bias=*/nullptr, sum_dy.const_data_ptr<acc_t>(),
                                    sum_dy_xmu.const_data_ptr<acc_t>(), acc_t(count), /*train=*/true,
                                    Activation::kIdentity, acc_t(0)},
                 g, dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                 grad_input.mutable_data_ptr<scalar_t>());
  });
  return grad_input;
}

// ---- the split ops' guard ----------------------------------------------------------

void update_running_stats(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<at::Tensor>& counters, const at::Tensor& mean_arg,
                          const at::Tensor& invstd_arg, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, int64_t count, double eps,
                          std::optional<double> momentum, bool single_sample) {
  TORCH_CHECK(mean_arg.is_cuda(), "the batch mean is on ", mean_arg.device(),
              " while other arguments are on a CUDA device. Keep the statistics on the module's device.");
  check_update_tensors(running_mean, running_var, num_batches_tracked, counters, mean_arg, invstd_arg, weight, bias,
                       momentum);
  const c10::cuda::CUDAGuard device_guard(mean_arg.device());
  if (count == 0) {
    count_empty_batch(running_mean, num_batches_tracked, counters);
    return;
  }
  const at::ScalarType acc = mean_arg.scalar_type();
  const at::Tensor mean = channel_values(mean_arg, acc), invstd = channel_values(invstd_arg, acc);
  const at::Tensor w = channel_values(weight, acc), b = channel_values(bias, acc);
  const RunningBuffers buffers(running_mean, running_var);
  AT_DISPATCH_FLOATING_TYPES(acc, "safebn_update_running_stats", [&] {
    using acc_t = scalar_t;
    const RunningStatsArgs<acc_t> args = running_stats_args<acc_t>(buffers, num_batches_tracked, counters, mean,
                                                                   invstd, w, b, count, single_sample, eps,
                                                                   momentum);
    if (!args.enabled) return;
    update_running_stats_kernel<acc_t><<<1, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  buffers.write_back(running_mean, running_var);
}

void check_running_stats(const at::Tensor& counters, const at::Tensor& running_mean, const at::Tensor& running_var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         double eps) {
  check_running_stats_args(counters, running_mean, running_var, weight, bias, eps);
  const c10::cuda::CUDAGuard device_guard(running_mean.device());
  const at::ScalarType acc = accumulate_type(running_var.scalar_type());
  const at::Tensor mean = channel_values(running_mean, acc), var = channel_values(running_var, acc);
  const at::Tensor w = channel_values(weight, acc), b = channel_values(bias, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "safebn_check_running_stats", [&] {
    using acc_t = scalar_t;
    check_running_stats_kernel<acc_t><<<1, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        counters.mutable_data_ptr<int64_t>(), mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
        data_or_null<acc_t>(w), data_or_null<acc_t>(b), mean.numel(), acc_t(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
