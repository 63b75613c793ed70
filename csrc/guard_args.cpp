// The guard's arguments from an op's tensors (guard_args.h).
#include "guard_args.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>

namespace safebn {

RunningBuffers::RunningBuffers(const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& num_batches_tracked)
    : mean(running_mean.has_value() ? running_mean->contiguous() : at::Tensor()),
      var(running_var.has_value() ? running_var->contiguous() : at::Tensor()),
      tracked(!num_batches_tracked.has_value()                ? at::Tensor()
              : num_batches_tracked->scalar_type() == at::kLong ? *num_batches_tracked
                                                                : num_batches_tracked->to(at::kLong)) {}

void RunningBuffers::write_back(const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var,
                                const std::optional<at::Tensor>& num_batches_tracked) const {
  if (running_mean.has_value() && !mean.is_same(*running_mean)) running_mean->copy_(mean);
  if (running_var.has_value() && !var.is_same(*running_var)) running_var->copy_(var);
  if (num_batches_tracked.has_value() && !tracked.is_same(*num_batches_tracked)) num_batches_tracked->copy_(tracked);
}

BufferType RunningBuffers::type() const {
  switch (mean.defined() ? mean.scalar_type() : at::kFloat) {
    case at::kDouble: return BufferType::kDouble;
    case at::kHalf: return BufferType::kHalf;
    case at::kBFloat16: return BufferType::kBFloat16;
    case at::kFloat: return BufferType::kFloat;
    default:
      TORCH_CHECK(false, "running statistics must be float32, float64, float16 or bfloat16, got ",
                  mean.scalar_type());
  }
}

double largest_finite_value(at::ScalarType buffer_type, bool accumulate_in_double) {
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buffer_type, "largest_finite", [&] {
    value = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return accumulate_in_double ? value : std::min<double>(value, std::numeric_limits<float>::max());
}

int64_t* counters_data(const std::optional<at::Tensor>& counters) {
  return counters.has_value() ? counters->mutable_data_ptr<int64_t>() : nullptr;
}

}  // namespace safebn
