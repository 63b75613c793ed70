// The guard's arguments (guard.h) from an op's tensors, on every device: the
// host code that the CPU ops and the CUDA launches share.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <type_traits>

#include "guard.h"

namespace safebn {

// The largest finite value of a buffer dtype that acc_t (float or double)
// also holds: the bound the guarded update keeps running statistics within.
double largest_finite_value(at::ScalarType buffer_type, bool accumulate_in_double);
template <typename acc_t>
acc_t largest_finite(at::ScalarType buffer_type) {
  return static_cast<acc_t>(largest_finite_value(buffer_type, std::is_same_v<acc_t, double>));
}

// A module's counters for the kernels; nullptr without counters.
int64_t* counters_data(const std::optional<at::Tensor>& counters);

// A per-channel tensor's values as a contiguous acc_t array on its device:
// the tensor's own memory in the usual case (acc_t, contiguous), which costs
// no dispatcher call (on a small batch a conversion's operator calls, or even
// a copy's allocation, cost more than the kernels), else a converted copy.
// data() is nullptr for a missing tensor; operator[] reads CPU values.
template <typename acc_t>
class ChannelValues {
 public:
  ChannelValues(const std::optional<at::Tensor>& t, acc_t fill = acc_t(0)) : fill_(fill) {
    if (!t.has_value() || !t->defined()) return;
    if (t->scalar_type() != c10::CppTypeToScalarType<acc_t>::value || !t->is_contiguous())
      converted_ = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    data_ = (converted_.defined() ? converted_ : *t).template const_data_ptr<acc_t>();
  }
  acc_t operator[](int64_t c) const { return data_ != nullptr ? data_[c] : fill_; }
  const acc_t* data() const { return data_; }

 private:
  at::Tensor converted_;
  const acc_t* data_ = nullptr;
  acc_t fill_;
};

// The buffers the guard updates in place: each as it is, or a copy (the
// statistics contiguous in their dtype, num_batches_tracked as int64, which
// native lets a module cast to float) that write_back() returns to it.
struct RunningBuffers {
  at::Tensor mean, var, tracked;

  RunningBuffers(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                 const std::optional<at::Tensor>& num_batches_tracked);
  void write_back(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                  const std::optional<at::Tensor>& num_batches_tracked) const;
  BufferType type() const;
  // The largest finite value of the buffers' dtype that acc_t also holds.
  template <typename acc_t>
  acc_t limit() const {
    return mean.defined() ? largest_finite<acc_t>(mean.scalar_type()) : acc_t(0);
  }
};

// The arguments of guarded_update after a batch of `count` values per channel
// with statistics `mean` and `invstd`: pointers into tensors that the caller
// keeps alive until the guard has run (for CUDA: until the launch is queued).
template <typename acc_t>
UpdateArgs<acc_t> update_args(const RunningBuffers& buffers, const std::optional<at::Tensor>& counters,
                              const ChannelValues<acc_t>& mean,
                              const ChannelValues<acc_t>& invstd, const ChannelValues<acc_t>& weight,
                              const ChannelValues<acc_t>& bias, int64_t channels, int64_t count, bool single_sample,
                              double eps, std::optional<double> momentum) {
  const bool has_buffers = buffers.mean.defined();
  return {has_buffers,
          has_buffers ? buffers.mean.mutable_data_ptr() : nullptr,
          has_buffers ? buffers.var.mutable_data_ptr() : nullptr,
          buffers.type(),
          buffers.tracked.defined() ? buffers.tracked.mutable_data_ptr<int64_t>() : nullptr,
          counters_data(counters),
          mean.data(),
          invstd.data(),
          weight.data(),
          bias.data(),
          channels,
          count,
          single_sample,
          acc_t(eps),
          momentum.has_value(),
          acc_t(momentum.value_or(0)),
          buffers.template limit<acc_t>()};
}

template <typename acc_t>
EvalCheckArgs<acc_t> eval_check_args(const std::optional<at::Tensor>& counters,
                                     const ChannelValues<acc_t>& running_mean,
                                     const ChannelValues<acc_t>& running_var, const ChannelValues<acc_t>& weight,
                                     const ChannelValues<acc_t>& bias, int64_t channels, double eps) {
  return {counters_data(counters), running_mean.data(), running_var.data(), weight.data(), bias.data(), channels,
          acc_t(eps)};
}

}  // namespace safebn
