// The argument checks every device's implementation shares (checks.h). Each
// raises the class native batch norm raises for the same input
// (RuntimeError, NotImplementedError for a dtype it has no kernel for), and
// says what to do.
#include "checks.h"

#include <cmath>
#include <string>

#include "contract.h"
#include "layout.h"

namespace safebn {

namespace {

// As Python spells it: torch.float32, not Float.
std::string dtype_name(at::ScalarType type) { return "torch." + std::string(c10::getDtypeNames(type).first); }

bool is_reduced_float(at::ScalarType type) { return type == at::kHalf || type == at::kBFloat16; }

// Whether the dtypes of the per-channel tensors that go with `input` are
// checked: native does not look at them for a batch without values.
bool checks_dtypes_for(const at::Tensor& input) { return input.numel() > 0; }

void check_same_device(const at::Tensor& t, const at::Device& device, const char* name, const char* device_of) {
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but ", device_of, " is on ", device,
              ". Move the module and the input to the same device.");
}

void check_buffer_dtypes(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK(!running_mean.has_value() || running_mean->scalar_type() == running_var->scalar_type(),
              "running_mean (", dtype_name(running_mean->scalar_type()), ") and running_var (",
              dtype_name(running_var->scalar_type()), ") must have the same dtype, as nn.BatchNorm's buffers do.");
}

}  // namespace

void check_input(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(input.scalar_type()),
                              "\"batch_norm\" not implemented for ", dtype_name(input.scalar_type()),
                              ": batch norm takes a floating-point input (float32, float64, float16 or bfloat16). "
                              "Convert the input with .float() first.");
  TORCH_CHECK_VALUE(input.dim() >= 2 && input.dim() <= 5,
                    "batch norm expects an input of 2 to 5 dimensions (N, C, ...), got ", input.dim(),
                    " dimensions with shape ", input.sizes(), ".");
}

void check_channel_tensor(const at::Tensor& t, const at::Tensor& input, const char* name) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, name, " should contain ", channels, " elements not ", t.numel(),
              ": one per channel of the input of shape ", input.sizes(), " (got shape ", t.sizes(),
              "). Check num_features of the module against the input's dimension 1.");
  check_same_device(t, input.device(), name, "the input");
  // nn.BatchNorm's rule: the input's dtype, or float32 for a half-precision
  // input (autocast's pairing).
  TORCH_CHECK(!checks_dtypes_for(input) || t.scalar_type() == input.scalar_type() ||
                  (t.scalar_type() == at::kFloat && is_reduced_float(input.scalar_type())),
              "mixed dtype: ", name, " has dtype ", dtype_name(t.scalar_type()), ", which does not go with an input "
              "of dtype ", dtype_name(input.scalar_type()), ": use the input's dtype (module.to(",
              dtype_name(input.scalar_type()), ")), or float32 parameters for a float16 or bfloat16 input, as "
              "nn.BatchNorm requires.");
}

void check_channel_tensor(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (t.has_value() && t->defined()) check_channel_tensor(*t, input, name);
}

void check_statistics(const at::Tensor& t, const at::Tensor& input, int64_t virtual_batch_size, const char* name) {
  if (virtual_batch_size <= 0) return check_channel_tensor(t, input, name);
  const int64_t chunks = chunk_count(input.size(0), virtual_batch_size);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == chunks && t.size(1) == input.size(1), name, " should have shape [",
              chunks, ", ", input.size(1), "] (chunks of virtual_batch_size ", virtual_batch_size,
              " examples, channels), got ", t.sizes());
  check_same_device(t, input.device(), name, "the input");
}

void check_grad_sums(const at::Tensor& sums, const at::Tensor& input) {
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == input.size(1), "sums should have shape [2, ",
              input.size(1), "] (sum(dz) and sum(dz * (x - mean)) per channel, as backward_reduce returns them), got ",
              sums.sizes());
  check_same_device(sums, input.device(), "sums", "the input");
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  TORCH_CHECK(!checks_dtypes_for(input) || sums.scalar_type() == acc, "sums has dtype ", dtype_name(sums.scalar_type()),
              " but backward_reduce returns them in ", dtype_name(acc), " for an input of dtype ",
              dtype_name(input.scalar_type()), ": pass its sums as they come.");
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps,
                    ": it keeps 1 / sqrt(var + eps) finite for a constant channel. The usual value is 1e-5.");
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output has shape ", grad_output.sizes(),
              " but the input has shape ", input.sizes(), ": the gradient of the op's output has its shape.");
  check_same_device(grad_output, input.device(), "grad_output", "the input");
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
  check_same_device(*t, mean.device(), name, "the statistics");
  TORCH_CHECK(!per_channel || t->numel() == mean.numel(), name, " should contain ", mean.numel(), " elements not ",
              t->numel(), ": one per channel. Check num_features of the module against the input's dimension 1.");
}

void check_counters(const std::optional<at::Tensor>& counters, const at::Device& device, const char* device_of) {
  if (!counters.has_value()) return;
  TORCH_CHECK(counters->scalar_type() == at::kLong && counters->numel() == kNumCounters && counters->is_contiguous(),
              "counters must be a contiguous int64 tensor of ", int64_t(kNumCounters),
              " elements (a module's safety_counters), got ", dtype_name(counters->scalar_type()), " of shape ",
              counters->sizes());
  check_same_device(*counters, device, "counters", device_of);
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

void check_training_buffers(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            const std::optional<at::Tensor>& counters, std::optional<double> momentum) {
  check_update_args(running_mean, running_var, num_batches_tracked, momentum);
  check_channel_tensor(running_mean, input, "running_mean");
  check_channel_tensor(running_var, input, "running_var");
  check_buffer_dtypes(running_mean, running_var);
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->numel() == 1, "num_batches_tracked must be a one-element tensor, got shape ",
                num_batches_tracked->sizes());
    check_same_device(*num_batches_tracked, input.device(), "num_batches_tracked", "the input");
  }
  check_counters(counters, input.device());
}

}  // namespace safebn
