// Batch norm with the statistics of a process group (SafeSyncBatchNorm), for
// every device at once (CompositeExplicitAutograd): each rank's statistics
// and the normalization are the device's ops, the collectives torch's
// functional ones (_c10d_functional), which torch.compile traces, and the
// guard the same guarded update as a local batch norm's, fed the group's
// statistics. Every decision is taken from the gathered values, which are the
// same on every rank, so that every rank takes the same one and none is left
// waiting in a collective the others skipped.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "layout.h"

namespace safebn {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

c10::OperatorHandle operator_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// The functional collectives take the group by name (their `Any` argument):
// called boxed.
Tensor wait(Tensor t) {
  static const auto op = operator_handle("_c10d_functional::wait_tensor").typed<Tensor(const Tensor&)>();
  return op.call(t);
}

Tensor all_gather(const Tensor& t, int64_t group_size, c10::string_view group_name) {
  static const c10::OperatorHandle op = operator_handle("_c10d_functional::all_gather_into_tensor");
  torch::jit::Stack stack{t, group_size, std::string(group_name)};
  op.callBoxed(stack);
  return wait(stack.back().toTensor());
}

Tensor all_reduce_sum(const Tensor& t, c10::string_view group_name) {
  static const c10::OperatorHandle op = operator_handle("_c10d_functional::all_reduce");
  torch::jit::Stack stack{t, std::string("sum"), std::string(group_name)};
  op.callBoxed(stack);
  return wait(stack.back().toTensor());
}

#define SAFEBN_TYPED_OP(function, name, ...)                                                 \
  const auto& function() {                                                                   \
    static const auto op = operator_handle(name).typed<__VA_ARGS__>();                       \
    return op;                                                                               \
  }

SAFEBN_TYPED_OP(batch_stats_op, "safebn::batch_stats", std::tuple<Tensor, Tensor>(const Tensor&))
SAFEBN_TYPED_OP(normalize_op, "safebn::normalize",
                Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       int64_t, double))
SAFEBN_TYPED_OP(eval_op, "safebn::batch_norm_eval",
                Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       const OptionalTensor&, double, int64_t, double))
SAFEBN_TYPED_OP(update_op, "safebn::update_running_stats",
                void(const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                     const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, c10::SymInt, double,
                     std::optional<double>, bool))
SAFEBN_TYPED_OP(backward_op, "safebn::backward",
                Grads(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                      const Tensor&, bool, std::array<bool, 3>, int64_t, double))
SAFEBN_TYPED_OP(backward_reduce_op, "safebn::backward_reduce",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                                           const OptionalTensor&, const OptionalTensor&, int64_t, double))
SAFEBN_TYPED_OP(backward_elemt_op, "safebn::backward_elemt",
                Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, c10::SymInt, const OptionalTensor&, int64_t, double))
#undef SAFEBN_TYPED_OP

// The group's batch from group_batch: values per channel and examples over every rank.
struct GroupTotals {
  int64_t count = 0, examples = 0;
};

GroupTotals totals(const Tensor& group_batch) {
  GroupTotals t;
  const auto rows = group_batch.accessor<int64_t, 2>();
  for (int64_t rank = 0; rank < rows.size(0); ++rank) {
    t.count += rows[rank][0];
    t.examples += rows[rank][1];
  }
  return t;
}

std::tuple<Tensor, Tensor, Tensor> sync_batch_stats(const Tensor& input, double eps, c10::string_view group_name,
                                                    int64_t group_size) {
  check_eps(eps);
  check_input(input);
  TORCH_CHECK_VALUE(group_size > 0, "group_size must be > 0, got ", group_size);
  const int64_t channels = input.size(1), count = values_per_channel(input);
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  // This rank's row: [count, examples, mean (C), variance (C)], in float64 so
  // that counts stay exact and the merge loses nothing. An empty batch sends
  // zeros, which its count of 0 weighs out of the merge (its statistics are
  // NaN and would poison every rank).
  const at::TensorOptions options = input.options().dtype(at::kDouble);
  Tensor statistics = at::zeros({2 * channels}, options);
  if (count > 0) {
    const auto [mean, var] = batch_stats_op().call(input);
    statistics = at::cat({mean, var}).to(at::kDouble);
  }
  const Tensor row = at::cat({at::full({1}, double(count), options), at::full({1}, double(input.size(0)), options),
                              statistics});
  const Tensor rows = all_gather(row, group_size, group_name).view({group_size, 2 * channels + 2});
  const Tensor counts = rows.narrow(1, 0, 1), means = rows.narrow(1, 2, channels),
               variances = rows.narrow(1, 2 + channels, channels);
  const Tensor finite = at::isfinite(rows.narrow(1, 2, 2 * channels)).all(1, /*keepdim=*/true);
  // The one host synchronization, as nn.SyncBatchNorm's: the ops take the
  // group's count as an integer, and the host's messages name ranks.
  const Tensor group_batch = at::cat({rows.narrow(1, 0, 2), finite.to(at::kDouble)}, 1).to(at::kLong).cpu();
  // Chan's merge: the statistics of the concatenated batch. A rank with
  // non-finite statistics and a positive count makes them non-finite on
  // every rank, so that every rank's guarded update skips.
  const Tensor share = counts / double(std::max<int64_t>(totals(group_batch).count, 1));
  const Tensor mean = (share * means).sum(0);
  const Tensor var = (share * (variances + (means - mean).square())).sum(0);
  return {mean.to(acc), (var.to(acc) + eps).rsqrt(), group_batch};
}

Tensor sync_batch_norm_train(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& running_mean, const OptionalTensor& running_var,
                             const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
                             const Tensor& mean, const Tensor& invstd, const Tensor& group_batch,
                             std::optional<double> momentum, double eps, c10::string_view group_name,
                             bool degenerate_uses_running_stats, bool refuse_single_sample, int64_t activation,
                             double activation_param) {
  check_eps(eps);
  check_input(input);
  check_training_buffers(input, running_mean, running_var, num_batches_tracked, counters, momentum);
  check_channel_tensor(mean, input, "mean");
  check_channel_tensor(invstd, input, "invstd");
  activation_arg(activation, activation_param);
  const GroupTotals group = totals(group_batch);
  if (group.count == 1) {  // degenerate: 0/0 variance over the whole group
    if (degenerate_uses_running_stats && running_mean.has_value())
      return eval_op().call(input, weight, bias, *running_mean, *running_var, counters, eps, activation,
                            activation_param);
    return at::zeros_like(input);
  }
  const bool single_sample = group.examples == 1 && group.count > 1;
  if (!(single_sample && refuse_single_sample)) {
    update_op().call(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias,
                     group.count, eps, momentum, single_sample);
  }
  return values_per_channel(input) > 0
             ? normalize_op().call(input, weight, bias, mean, invstd, activation, activation_param)
             : at::empty_like(input);
}

Grads sync_batch_norm_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd,
                               const Tensor& group_batch, c10::string_view group_name,
                               std::array<bool, 3> output_mask, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, double eps, int64_t activation,
                               double activation_param) {
  const GroupTotals group = totals(group_batch);
  if (group.count == 1) {  // normalized with the running statistics: constants, no collective
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "the backward of a degenerate batch "
                "normalized with the running statistics needs them");
    const at::ScalarType acc = accumulate_type(input.scalar_type());
    return backward_op().call(grad_output, input, weight, bias, running_mean->to(acc),
                              (running_var->to(acc) + eps).rsqrt(), /*train=*/false, output_mask, activation,
                              activation_param);
  }
  auto [sum_dy, sum_dy_xmu] =
      backward_reduce_op().call(grad_output, input, mean, weight, bias, invstd, activation, activation_param);
  Tensor grad_input, grad_weight, grad_bias;
  // grad_weight and grad_bias are this rank's share, as nn.SyncBatchNorm
  // returns them: DDP averages parameter gradients over the ranks, and summing
  // them here as well would scale them by the world size.
  const bool has_weight = weight.has_value() && weight->defined();
  const at::ScalarType param_type = has_weight ? weight->scalar_type() : sum_dy.scalar_type();
  if (output_mask[1] && has_weight)
    grad_weight = (group.count > 0 ? sum_dy_xmu * invstd : at::zeros_like(sum_dy_xmu)).to(param_type);
  if (output_mask[2]) grad_bias = sum_dy.to(param_type);
  if (output_mask[0]) {
    const Tensor sums = all_reduce_sum(at::cat({sum_dy, sum_dy_xmu}), group_name);
    const int64_t channels = sum_dy.numel();
    grad_input = values_per_channel(input) > 0
                     ? backward_elemt_op().call(grad_output, input, weight, mean, invstd, sums.narrow(0, 0, channels),
                                                sums.narrow(0, channels, channels), group.count, bias, activation,
                                                activation_param)
                     : at::empty_like(input);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, CompositeExplicitAutograd, m) {
  m.impl("sync_batch_stats", &sync_batch_stats);
  m.impl("sync_batch_norm_train", &sync_batch_norm_train);
  m.impl("sync_batch_norm_backward", &sync_batch_norm_backward);
}

}  // namespace safebn
