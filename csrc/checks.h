// Argument checks shared by every device's implementation: one place that
// decides what the ops accept and says what to do when they do not.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "activation.h"

namespace safebn {

// Validates a batch-norm input (floating dtype, 2 to 5 dimensions).
void check_input(const at::Tensor& input);

// Validates a per-channel tensor (weight, bias, mean, invstd, running stats):
// C elements, on the input's device, of the input's dtype or, for a float16 or
// bfloat16 input, float32 (nn.BatchNorm's pairing).
void check_channel_tensor(const at::Tensor& t, const at::Tensor& input, const char* name);
void check_channel_tensor(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name);

void check_eps(double eps);

// A forward's statistics as its backward takes them: per channel ([C]), or
// a ghost batch norm's per chunk ([chunks, C], layout.h), on the input's device.
void check_statistics(const at::Tensor& t, const at::Tensor& input, int64_t virtual_batch_size, const char* name);

// backward_elemt's sums, as backward_reduce returns them: [2, C] in the input's
// accumulation dtype, on its device.
void check_grad_sums(const at::Tensor& sums, const at::Tensor& input);

// A backward's grad_output: the input's shape, on the input's device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input);

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

// What every device's check_running_stats requires of its arguments.
void check_running_stats_args(const at::Tensor& counters, const at::Tensor& running_mean,
                              const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps);

// What forward_train requires of the buffers it updates, checked before
// anything is computed: an error leaves every buffer as it was.
void check_training_buffers(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            const std::optional<at::Tensor>& counters, std::optional<double> momentum);

}  // namespace safebn
