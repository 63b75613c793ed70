// Argument checks shared by every device's implementation: one place that
// decides what the ops accept and says what to do when they do not.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <type_traits>

#include "activation.h"
#include "geometry.h"

namespace safebn {

// Validates a batch-norm input (floating dtype, 2 to 5 dimensions).
void check_input(const at::Tensor& input);

// Validates a per-channel tensor (weight, bias, mean, invstd, running stats):
// C elements, on the input's device, of the input's dtype or, for a float16 or
// bfloat16 input, float32 (nn.BatchNorm's pairing).
void check_channel_tensor(const at::Tensor& t, const at::Tensor& input, const char* name);
void check_channel_tensor(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name);

void check_eps(double eps);

// An op's `activation` and `activation_param` arguments, checked.
ActivationArg activation_arg(int64_t code, double param);

// What every device's update_running_stats requires of its buffers.
void check_update_args(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum);

// A tensor the guard reads or writes beside the statistics `mean` (a per-channel
// one has mean's number of values): on mean's device.
void check_guard_tensor(const std::optional<at::Tensor>& t, const at::Tensor& mean, const char* name,
                        bool per_channel);

// A module's counters: kNumCounters contiguous int64 values on `device`,
// that of `device_of` (named in the error).
void check_counters(const std::optional<at::Tensor>& counters, const at::Device& device,
                    const char* device_of = "the input");

// What every device's update_running_stats requires: the buffers as
// check_update_args says, and every tensor on the device of the batch's
// statistics `mean`, the per-channel ones with mean's number of values.
void check_update_tensors(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<at::Tensor>& counters, const at::Tensor& mean, const at::Tensor& invstd,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          std::optional<double> momentum);

// The counters' values for the kernels; nullptr without counters.
int64_t* counters_data(const std::optional<at::Tensor>& counters);

// What every device's check_running_stats requires of its arguments.
void check_running_stats_args(const at::Tensor& counters, const at::Tensor& running_mean,
                              const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps);

// The largest finite value of a buffer dtype that acc_t (float or double)
// also holds: the bound the guarded update keeps running statistics within.
double largest_finite_value(at::ScalarType buffer_type, bool accumulate_in_double);
template <typename acc_t>
acc_t largest_finite(at::ScalarType buffer_type) {
  return static_cast<acc_t>(largest_finite_value(buffer_type, std::is_same_v<acc_t, double>));
}

// What forward_train requires of the buffers it updates, checked before
// anything is computed: an error leaves every buffer as it was.
void check_training_buffers(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            const std::optional<at::Tensor>& counters, std::optional<double> momentum);

// The input in a layout the kernels walk directly: contiguous, channels_last
// or channels_last_3d are returned as they are; any other strides are copied
// to contiguous (the one case where the activation is copied).
at::Tensor with_kernel_layout(const at::Tensor& input);

// `t` (a gradient) laid out exactly like `like`, which has a kernel layout.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like);

Geometry geometry_of(const at::Tensor& input_with_kernel_layout);

// float32 for float/half/bfloat16 input, float64 for float64 input.
at::ScalarType accumulate_type(at::ScalarType input_type);

// An uninitialized per-channel statistic (mean, invstd, ...) for `input`, in
// the accumulation dtype on its device.
at::Tensor channel_stat_tensor(const at::Tensor& input);

// The statistics of an input with no values, on every device: undefined, NaN
// in every channel.
at::Tensor undefined_channel_stats(const at::Tensor& input);

}  // namespace safebn
