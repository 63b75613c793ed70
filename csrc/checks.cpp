// The argument checks every device's implementation shares (checks.h).
#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "guard.h"

namespace safebn {

namespace {

// As Python spells it: torch.float32, not Float.
std::string dtype_name(at::ScalarType type) { return "torch." + std::string(c10::getDtypeNames(type).first); }

void check_buffer_dtypes(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK(!running_mean.has_value() || running_mean->scalar_type() == running_var->scalar_type(),
              "running_mean (", dtype_name(running_mean->scalar_type()), ") and running_var (",
              dtype_name(running_var->scalar_type()), ") must have the same dtype, as nn.BatchNorm's buffers do.");
}

}  // namespace

void check_input(const at::Tensor& input) {
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
              "batch norm expects a floating-point input (float32, float64, float16 or bfloat16), "
              "got ", dtype_name(input.scalar_type()), ". Convert the input with .float() first.");
  TORCH_CHECK_VALUE(input.dim() >= 2 && input.dim() <= 5,
              "batch norm expects an input of 2 to 5 dimensions (N, C, ...), got ", input.dim(),
              " dimensions with shape ", input.sizes(), ".");
}

bool is_reduced_float(at::ScalarType type) { return type == at::kHalf || type == at::kBFloat16; }

void check_channel_tensor(const at::Tensor& t, const at::Tensor& input, const char* name) {
  const int64_t channels = input.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == channels, name, " must have one value per channel: expected shape [",
              channels, "] for an input of shape ", input.sizes(), ", got ", t.sizes(),
              ". Check num_features of the module against the input's dimension 1.");
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " is on ", t.device(), " but the input is on ",
              input.device(), ". Move the module and the input to the same device.");
  // nn.BatchNorm's rule: the input's dtype, or float32 for a half-precision
  // input (autocast's pairing).
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type() ||
                  (t.scalar_type() == at::kFloat && is_reduced_float(input.scalar_type())),
              name, " has dtype ", dtype_name(t.scalar_type()), ", which does not go with an input of dtype ",
              dtype_name(input.scalar_type()), ": use the input's dtype (module.to(", dtype_name(input.scalar_type()),
              ")), or float32 parameters for a float16 or bfloat16 input, as nn.BatchNorm requires.");
}

void check_channel_tensor(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (t.has_value() && t->defined()) check_channel_tensor(*t, input, name);
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps,
              ": it keeps 1 / sqrt(var + eps) finite for a constant channel. The usual value is 1e-5.");
}

ActivationArg activation_arg(int64_t code, double param) {
  TORCH_CHECK_VALUE(code >= 0 && code < int64_t(Activation::kCount), "activation must be a code of ",
                    "torch_safebn.activations.Activation (0 to ", int64_t(Activation::kCount) - 1, "), got ", code);
  TORCH_CHECK_VALUE(std::isfinite(param), "activation_param must be finite, got ", param);
  return {Activation(code), param};
}

void check_update_args(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must be given together");
  TORCH_CHECK_VALUE(momentum.has_value() || num_batches_tracked.has_value() || !running_mean.has_value(),
              "momentum=None (a cumulative average) needs num_batches_tracked");
  TORCH_CHECK_VALUE(!momentum.has_value() || (*momentum >= 0 && *momentum <= 1),
              "momentum must be None (a cumulative average) or in [0, 1], got ", *momentum);
}

void check_guard_tensor(const std::optional<at::Tensor>& t, const at::Tensor& mean, const char* name,
                        bool per_channel) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == mean.device(), name, " is on ", t->device(), " but the statistics are on ",
                    mean.device(), ". Move the module and the input to the same device.");
  TORCH_CHECK_VALUE(!per_channel || t->numel() == mean.numel(), name, " must have one value per channel (",
                    mean.numel(), "), got shape ", t->sizes(), ". Check num_features of the module against the "
                    "input's dimension 1.");
}

void check_update_tensors(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<at::Tensor>& counters, const at::Tensor& mean, const at::Tensor& invstd,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          std::optional<double> momentum) {
  check_update_args(running_mean, running_var, num_batches_tracked, momentum);
  check_guard_tensor(invstd, mean, "invstd", true);
  check_guard_tensor(weight, mean, "weight", true);
  check_guard_tensor(bias, mean, "bias", true);
  check_guard_tensor(running_mean, mean, "running_mean", true);
  check_guard_tensor(running_var, mean, "running_var", true);
  check_guard_tensor(num_batches_tracked, mean, "num_batches_tracked", false);
  check_counters(counters, mean.device(), "the statistics");
  check_buffer_dtypes(running_mean, running_var);
}

void check_running_stats_args(const at::Tensor& counters, const at::Tensor& running_mean,
                              const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  check_eps(eps);
  check_counters(counters, running_mean.device(), "the running statistics");
  check_guard_tensor(running_var, running_mean, "running_var", true);
  check_guard_tensor(weight, running_mean, "weight", true);
  check_guard_tensor(bias, running_mean, "bias", true);
}

int64_t* counters_data(const std::optional<at::Tensor>& counters) {
  return counters.has_value() ? counters->mutable_data_ptr<int64_t>() : nullptr;
}

double largest_finite_value(at::ScalarType buffer_type, bool accumulate_in_double) {
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buffer_type, "largest_finite", [&] {
    value = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return accumulate_in_double ? value : std::min<double>(value, std::numeric_limits<float>::max());
}

void check_counters(const std::optional<at::Tensor>& counters, const at::Device& device, const char* device_of) {
  if (!counters.has_value()) return;
  TORCH_CHECK(counters->scalar_type() == at::kLong && counters->numel() == kNumCounters && counters->is_contiguous(),
              "counters must be a contiguous int64 tensor of ", int64_t(kNumCounters),
              " elements (a module's safety_counters), got ", dtype_name(counters->scalar_type()), " of shape ",
              counters->sizes());
  TORCH_CHECK_VALUE(counters->device() == device, "counters are on ", counters->device(), " and ", device_of, " on ",
                    device, ". Move the module and the input to the same device.");
}

void check_training_buffers(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            const std::optional<at::Tensor>& counters, std::optional<double> momentum) {
  check_update_args(running_mean, running_var, num_batches_tracked, momentum);
  check_channel_tensor(running_mean, input, "running_mean");
  check_channel_tensor(running_var, input, "running_var");
  check_buffer_dtypes(running_mean, running_var);
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1,
                "num_batches_tracked must be a one-element int64 tensor, got ", dtype_name(num_batches_tracked->scalar_type()),
                " of shape ", num_batches_tracked->sizes());
    TORCH_CHECK_VALUE(num_batches_tracked->device() == input.device(), "num_batches_tracked is on ",
                num_batches_tracked->device(), " but the input is on ", input.device(),
                ". Move the module and the input to the same device.");
  }
  check_counters(counters, input.device());
}

namespace {

std::optional<at::MemoryFormat> kernel_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return std::nullopt;
}

}  // namespace

at::Tensor with_kernel_layout(const at::Tensor& input) {
  return kernel_memory_format(input).has_value() ? input : input.contiguous();
}

at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  const at::MemoryFormat format = *kernel_memory_format(like);
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

Geometry geometry_of(const at::Tensor& input) {
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.spatial *= input.size(d);
  // [N, C] is walked as rows of C channels, the better vectorized of the two.
  g.channels_last = input.dim() == 2 || *kernel_memory_format(input) != at::MemoryFormat::Contiguous;
  return g;
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor channel_stat_tensor(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(accumulate_type(input.scalar_type())));
}

at::Tensor undefined_channel_stats(const at::Tensor& input) { return channel_stat_tensor(input).fill_(NAN); }

}  // namespace safebn
