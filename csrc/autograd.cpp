// Autograd of the forwards (forward_train, batch_norm_eval and
// sync_batch_norm_train), in C++ on the Autograd key: the forward
// redispatches below autograd and records one backward node, whose apply is
// one op call (safebn::backward, or safebn::sync_batch_norm_backward with its
// all-reduce). Everything either direction calls goes through the dispatcher
// to ops with fake kernels, so that AOTAutograd traces it like any ATen op.
//
// The node is written as ATen's generated ones are (a Node with its saved
// variables as fields), not as a torch::autograd::Function: on a small batch
// the Function's generic bookkeeping (a hash map of saved scalars, per-input
// metadata vectors, output wrapping) cost more host time per step than the
// kernels, and took a training step past native batch norm's. Python's
// torch.library.register_autograd refuses mutable ops.
//
// Forward-mode AD (a dual input, weight or bias): the output is the forward
// recomputed in ATen ops (composite.h), whose tangent autograd computes; the
// kernels still run below autograd for the guard's update and checks.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/rsqrt.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "composite.h"
#include "group_batch.h"
#include "layout.h"

namespace safebn {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

// ---- the ops below autograd, looked up once -------------------------------------

#define SAFEBN_TYPED_OP(function, name, ...)                                                            \
  const auto& function() {                                                                              \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<__VA_ARGS__>(); \
    return op;                                                                                          \
  }

SAFEBN_TYPED_OP(train_op, "safebn::forward_train",
                std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                                   const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                                   const OptionalTensor&, std::optional<double>, double, int64_t,
                                                   double, c10::SymInt))
SAFEBN_TYPED_OP(eval_op, "safebn::batch_norm_eval",
                Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       const OptionalTensor&, double, int64_t, double))
SAFEBN_TYPED_OP(sync_op, "safebn::sync_batch_norm_train",
                std::tuple<Tensor, Tensor, Tensor, Tensor>(
                    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, std::optional<double>, double,
                    c10::string_view, int64_t, int64_t, int64_t, bool, bool, int64_t, double))
SAFEBN_TYPED_OP(sync_normalize_op, "safebn::sync_normalize",
                Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                       const OptionalTensor&, const Tensor&, const Tensor&, const Tensor&, double, c10::string_view,
                       int64_t, double))
SAFEBN_TYPED_OP(backward_op, "safebn::backward",
                Grads(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                      const Tensor&, bool, std::array<bool, 3>, int64_t, double, c10::SymInt))
SAFEBN_TYPED_OP(sync_backward_op, "safebn::sync_batch_norm_backward",
                Grads(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                      const Tensor&, const Tensor&, c10::string_view, std::array<bool, 3>, const OptionalTensor&,
                      const OptionalTensor&, double, int64_t, double))
#undef SAFEBN_TYPED_OP

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// ---- the backward node --------------------------------------------------------

// The process group whose statistics a forward took (SafeSyncBatchNorm).
struct Group {
  std::string name;
  SavedVariable batch;  // the forward's group_batch: values per channel and examples by rank
  // a degenerate group batch normalized with the running statistics: them
  SavedVariable running_mean, running_var;
};

// The backward of one forward call. Its edges are (input, weight, bias), an
// absent weight or bias an empty edge.
struct BatchNormBackward : public torch::autograd::TraceableFunction {
  SavedVariable input_, weight_, bias_;
  SavedVariable mean_, invstd_;               // train: the batch's (or the group's)
  SavedVariable running_mean_, running_var_;  // eval: the constants normalized with
  bool train = true;
  double eps = 0;
  ActivationArg activation;
  int64_t virtual_batch_size = 0;  // a ghost batch norm's chunks (layout.h)
  std::optional<Group> group;

  std::string name() const override {
    if (group.has_value()) return "SafeSyncBatchNormBackward";
    return train ? "SafeBatchNormTrainBackward" : "SafeBatchNormEvalBackward";
  }

  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&input_, &weight_, &bias_, &mean_, &invstd_, &running_mean_, &running_var_})
      saved->reset_data();
    if (group.has_value())
      for (SavedVariable* saved : {&group->batch, &group->running_mean, &group->running_var}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    const Tensor& grad_output = grads[0];
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2)};
    if (!grad_output.defined()) return {Tensor(), Tensor(), Tensor()};
    const Tensor input = input_.unpack(), weight = weight_.unpack(), bias = bias_.unpack();
    Tensor mean, invstd, running_mean, running_var;
    if (train) {
      mean = mean_.unpack();
      invstd = invstd_.unpack();
    } else {
      running_mean = running_mean_.unpack();
      running_var = running_var_.unpack();
      const at::ScalarType acc = accumulate_type(input.scalar_type());
      mean = running_mean.to(acc);
      invstd = at::rsqrt(running_var.to(acc) + eps);
    }
    if (torch::autograd::GradMode::is_enabled()) {
      TORCH_CHECK(!group.has_value(), "SafeSyncBatchNorm has no double backward (nn.SyncBatchNorm neither): its "
                  "backward all-reduces across the process group. Call backward() without create_graph=True.");
      return double_backward(grad_output, input, weight, bias, running_mean, running_var, mask);
    }
    // The backward ops have no derivative: skip their autograd fallback.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t act = int64_t(activation.kind);
    auto [grad_input, grad_weight, grad_bias] =
        group.has_value()
            ? sync_backward_op().call(grad_output, input, optional(weight), optional(bias), mean, invstd,
                                      group->batch.unpack(), group->name, mask, optional(group->running_mean.unpack()),
                                      optional(group->running_var.unpack()), eps, act, activation.param)
            : backward_op().call(grad_output, input, optional(weight), optional(bias), mean, invstd, train, mask,
                                 act, activation.param, virtual_batch_size);
    return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor()};
  }

  // backward(create_graph=True): differentiate the forward recomputed in ATen
  // ops, so that second derivatives see the batch statistics' dependence on
  // the input.
  variable_list double_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                const Tensor& bias, const Tensor& running_mean, const Tensor& running_var,
                                const std::array<bool, 3>& mask) const {
    const std::array<Tensor, 3> arguments{input, weight, bias};
    variable_list wanted;
    for (size_t i = 0; i < 3; ++i)
      if (mask[i]) wanted.push_back(arguments[i]);
    const Tensor output = composite_forward(input, weight, bias, running_mean, running_var, eps, train, activation,
                                            virtual_batch_size);
    const variable_list found = torch::autograd::grad({output}, wanted, {grad_output}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
    variable_list result(3);
    for (size_t i = 0, next = 0; i < 3; ++i)
      if (mask[i]) result[i] = found[next++];
    return result;
  }
};

// ---- the autograd kernels ---------------------------------------------------------

bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }

bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const OptionalTensor& t) { return t.has_value() && has_tangent(*t); }

// As native batch norm: the running statistics are buffers, not something to
// differentiate against.
void check_not_differentiated(const OptionalTensor& t, const char* name) {
  TORCH_CHECK(!(torch::autograd::GradMode::is_enabled() && requires_grad(t)), name,
              " requires grad, but batch norm does not differentiate with respect to the running statistics "
              "(nn.BatchNorm raises here too). Keep it a buffer, or pass ", name, ".detach().");
}

// The mutated buffers' version counters move, as for any in-place op, so that
// autograd notices a saved buffer that changed before its backward.
void bump_versions(std::initializer_list<const OptionalTensor*> buffers) {
  for (const OptionalTensor* t : buffers)
    if (t->has_value()) torch::autograd::impl::bump_version(**t);
}

// The node for a call on (input, weight, bias), or null where no gradient is wanted.
c10::intrusive_ptr<BatchNormBackward> backward_node(const Tensor& input, const OptionalTensor& weight,
                                                    const OptionalTensor& bias, double eps, int64_t activation,
                                                    double activation_param) {
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) return nullptr;
  auto node = c10::make_intrusive<BatchNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  node->eps = eps;
  node->activation = activation_arg(activation, activation_param);
  return node;
}

void save_inputs(BatchNormBackward& node, const Tensor& input, const OptionalTensor& weight,
                 const OptionalTensor& bias) {
  node.input_ = SavedVariable(input, /*is_output=*/false);
  if (weight.has_value()) node.weight_ = SavedVariable(*weight, false);
  if (bias.has_value()) node.bias_ = SavedVariable(*bias, false);
}

void save_statistics(BatchNormBackward& node, const Tensor& mean, const Tensor& invstd) {
  node.mean_ = SavedVariable(mean, false);
  node.invstd_ = SavedVariable(invstd, false);
}

// A forward with a dual input, weight or bias: the output in ATen ops, which
// carry the tangent (and their own backward graph).
Tensor dual_output(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                   const Tensor& running_mean, const Tensor& running_var, double eps, bool train,
                   int64_t activation, double activation_param, int64_t virtual_batch_size = 0) {
  return composite_forward(input, weight.value_or(Tensor()), bias.value_or(Tensor()), running_mean, running_var, eps,
                           train, activation_arg(activation, activation_param), virtual_batch_size);
}

bool any_tangent(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias) {
  return has_tangent(input) || has_tangent(weight) || has_tangent(bias);
}

std::tuple<Tensor, Tensor, Tensor> forward_train_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps, int64_t activation, double activation_param,
    int64_t virtual_batch_size) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  const bool dual = any_tangent(input, weight, bias);
  const auto node = dual ? nullptr : backward_node(input, weight, bias, eps, activation, activation_param);
  std::tuple<Tensor, Tensor, Tensor> result;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = train_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                             momentum, eps, activation, activation_param, virtual_batch_size);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked, &counters});
  auto& [output, mean, invstd] = result;
  if (dual) {
    output = dual_output(input, weight, bias, Tensor(), Tensor(), eps, /*train=*/true, activation, activation_param,
                         virtual_batch_size);
  } else if (node) {
    torch::autograd::set_history(output, node);  // mean and invstd are not differentiable
    save_inputs(*node, input, weight, bias);
    save_statistics(*node, mean, invstd);
    node->virtual_batch_size = virtual_batch_size;
  }
  return result;
}

Tensor batch_norm_eval_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                const Tensor& running_mean, const Tensor& running_var, const OptionalTensor& counters,
                                double eps, int64_t activation, double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  const bool dual = any_tangent(input, weight, bias);
  TORCH_CHECK(!(dual && (has_tangent(running_mean) || has_tangent(running_var))),
              "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad "
              "defined (as for nn.BatchNorm): make them plain tensors, or differentiate in training mode.");
  const auto node = dual ? nullptr : backward_node(input, weight, bias, eps, activation, activation_param);
  Tensor output;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = eval_op().call(input, weight, bias, running_mean, running_var, counters, eps, activation,
                            activation_param);
  }
  bump_versions({&counters});
  if (dual) {
    return dual_output(input, weight, bias, running_mean, running_var, eps, /*train=*/false, activation,
                       activation_param);
  }
  if (node) {
    torch::autograd::set_history(output, node);
    save_inputs(*node, input, weight, bias);
    node->train = false;
    node->running_mean_ = SavedVariable(running_mean, false);
    node->running_var_ = SavedVariable(running_var, false);
  }
  return output;
}

void check_no_tangent_for_group(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias) {
  TORCH_CHECK(!any_tangent(input, weight, bias), "SafeSyncBatchNorm has no forward-mode AD (nn.SyncBatchNorm "
              "neither): its statistics come from the process group.");
}

// The history of a synchronized forward's output. The group's statistics are
// constants of its graph: its backward accounts for their dependence on every
// rank's input (the all-reduce of its two sums), as native's SyncBatchNorm
// does. A degenerate group batch normalized with the running statistics has
// eval mode's backward, which takes them; only then are they saved, so that
// a later forward's update of them does not invalidate this backward.
void record_group_backward(const c10::intrusive_ptr<BatchNormBackward>& node, const Tensor& output,
                           const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const Tensor& mean, const Tensor& invstd, const Tensor& group_batch,
                           c10::string_view group_name, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var) {
  if (!node) return;
  torch::autograd::set_history(output, node);
  save_inputs(*node, input, weight, bias);
  save_statistics(*node, mean, invstd);
  node->group = Group{std::string(group_name), SavedVariable(group_batch, false), SavedVariable(), SavedVariable()};
  if (running_mean.has_value() && totals(group_batch).degenerate()) {
    node->group->running_mean = SavedVariable(*running_mean, false);
    node->group->running_var = SavedVariable(*running_var, false);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sync_batch_norm_train_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps, c10::string_view group_name, int64_t group_size, int64_t module,
    int64_t name, bool degenerate_uses_running_stats, bool refuse_single_sample, int64_t activation,
    double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  check_no_tangent_for_group(input, weight, bias);
  const auto node = backward_node(input, weight, bias, eps, activation, activation_param);
  std::tuple<Tensor, Tensor, Tensor, Tensor> result;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = sync_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum,
                            eps, group_name, group_size, module, name, degenerate_uses_running_stats,
                            refuse_single_sample, activation, activation_param);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked, &counters});
  const auto& [output, mean, invstd, group_batch] = result;
  const bool with_running_stats = degenerate_uses_running_stats && running_mean.has_value();
  record_group_backward(node, output, input, weight, bias, mean, invstd, group_batch, group_name,
                        with_running_stats ? running_mean : std::nullopt,
                        with_running_stats ? running_var : std::nullopt);
  return result;
}

Tensor sync_normalize_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& running_mean, const OptionalTensor& running_var,
                               const Tensor& mean, const Tensor& invstd, const Tensor& group_batch, double eps,
                               c10::string_view group_name, int64_t activation, double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  check_no_tangent_for_group(input, weight, bias);
  const auto node = backward_node(input, weight, bias, eps, activation, activation_param);
  Tensor output;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = sync_normalize_op().call(input, weight, bias, running_mean, running_var, mean, invstd, group_batch, eps,
                                      group_name, activation, activation_param);
  }
  record_group_backward(node, output, input, weight, bias, mean, invstd, group_batch, group_name, running_mean,
                        running_var);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, Autograd, m) {
  m.impl("forward_train", &forward_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
  m.impl("sync_batch_norm_train", &sync_batch_norm_train_autograd);
  m.impl("sync_normalize", &sync_normalize_autograd);
}

}  // namespace safebn
