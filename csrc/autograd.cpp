// Autograd of forward_train and batch_norm_eval, in C++ on the Autograd key:
// the forward redispatches below autograd and records one backward node,
// whose apply is one call of safebn::backward. Everything either direction
// calls goes through the dispatcher to ops with fake kernels, so that
// AOTAutograd traces it like any ATen op.
//
// The node is written as ATen's generated ones are (a Node with its saved
// variables as fields), not as a torch::autograd::Function: on a small batch
// the Function's generic bookkeeping (a hash map of saved scalars, per-input
// metadata vectors, output wrapping) cost more host time per step than the
// kernels, and took a training step past native batch norm's. Python's
// torch.library.register_autograd refuses mutable ops.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/var_mean.h>
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

namespace safebn {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;

// ---- the ops below autograd, looked up once -------------------------------------

const auto& train_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::forward_train", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                                    const OptionalTensor&, const OptionalTensor&,
                                                    const OptionalTensor&, const OptionalTensor&,
                                                    std::optional<double>, double, int64_t, double)>();
  return op;
}

const auto& eval_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("safebn::batch_norm_eval", "")
                             .typed<Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                           const Tensor&, const Tensor&, const OptionalTensor&, double, int64_t,
                                           double)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                    const OptionalTensor&, const Tensor&, const Tensor&, bool,
                                                    std::array<bool, 3>, int64_t, double)>();
  return op;
}

// ---- the double backward ----------------------------------------------------

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// act(z) in ATen ops, which autograd differentiates.
Tensor activate(const Tensor& z, ActivationArg activation) {
  switch (activation.kind) {
    case Activation::kRelu: return at::relu(z);
    case Activation::kRelu6: return at::hardtanh(z, 0, 6);
    case Activation::kLeakyRelu: return at::leaky_relu(z, activation.param);
    case Activation::kSilu: return at::silu(z);
    case Activation::kGelu: return at::gelu(z, "none");
    case Activation::kGeluTanh: return at::gelu(z, "tanh");
    case Activation::kHardswish: return at::hardswish(z);
    default: return z;
  }
}

// The forward as ATen ops: with the batch's statistics recomputed from the
// input (train) or the running ones as constants (eval).
Tensor composite_forward(const Tensor& input, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                         const Tensor& running_var, double eps, bool train, ActivationArg activation) {
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  std::vector<int64_t> dims{0}, shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  shape[1] = input.size(1);
  const Tensor x = input.to(acc);
  Tensor mean, var;
  if (train) {
    std::tie(var, mean) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/true);
  } else {
    mean = running_mean.to(acc).view(shape);
    var = running_var.to(acc).view(shape);
  }
  Tensor z = (x - mean) * at::rsqrt(var + eps);
  if (weight.defined()) z = z * weight.to(acc).view(shape);
  if (bias.defined()) z = z + bias.to(acc).view(shape);
  return activate(z, activation).to(input.scalar_type());
}

// ---- the backward node --------------------------------------------------------

// The backward of one forward_train or batch_norm_eval call. Its edges are
// (input, weight, bias), an absent weight or bias an empty edge.
struct BatchNormBackward : public torch::autograd::TraceableFunction {
  SavedVariable input_, weight_, bias_;
  SavedVariable mean_, invstd_;                 // train: the batch's
  SavedVariable running_mean_, running_var_;  // eval: the constants normalized with
  bool train = true;
  double eps = 0;
  ActivationArg activation;

  std::string name() const override { return train ? "SafeBatchNormTrainBackward" : "SafeBatchNormEvalBackward"; }

  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&input_, &weight_, &bias_, &mean_, &invstd_, &running_mean_, &running_var_})
      saved->reset_data();
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
      // backward(create_graph=True): differentiate the forward recomputed in
      // ATen ops, so that second derivatives see the batch statistics'
      // dependence on the input.
      const std::array<Tensor, 3> arguments{input, weight, bias};
      variable_list wanted;
      for (size_t i = 0; i < 3; ++i)
        if (mask[i]) wanted.push_back(arguments[i]);
      const Tensor output = composite_forward(input, weight, bias, running_mean, running_var, eps, train, activation);
      const variable_list found = torch::autograd::grad({output}, wanted, {grad_output}, /*retain_graph=*/true,
                                                        /*create_graph=*/true, /*allow_unused=*/true);
      variable_list result(3);
      for (size_t i = 0, next = 0; i < 3; ++i)
        if (mask[i]) result[i] = found[next++];
      return result;
    }
    // safebn::backward has no derivative: skip its autograd fallback.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_weight, grad_bias] = backward_op().call(
        grad_output, input, optional(weight), optional(bias), mean, invstd, train, mask,
        int64_t(activation.kind), activation.param);
    return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor()};
  }
};

// ---- the autograd kernels ---------------------------------------------------------

bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }

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

void save_parameters(BatchNormBackward& node, const Tensor& input, const OptionalTensor& weight,
                     const OptionalTensor& bias) {
  node.input_ = SavedVariable(input, /*is_output=*/false);
  if (weight.has_value()) node.weight_ = SavedVariable(*weight, false);
  if (bias.has_value()) node.bias_ = SavedVariable(*bias, false);
}

std::tuple<Tensor, Tensor, Tensor> forward_train_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps, int64_t activation, double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  const auto node = backward_node(input, weight, bias, eps, activation, activation_param);
  std::tuple<Tensor, Tensor, Tensor> result;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = train_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                             momentum, eps, activation, activation_param);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked, &counters});
  if (node) {
    const auto& [output, mean, invstd] = result;
    torch::autograd::set_history(output, node);  // mean and invstd are not differentiable
    save_parameters(*node, input, weight, bias);
    node->mean_ = SavedVariable(mean, false);
    node->invstd_ = SavedVariable(invstd, false);
  }
  return result;
}

Tensor batch_norm_eval_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                const Tensor& running_mean, const Tensor& running_var, const OptionalTensor& counters,
                                double eps, int64_t activation, double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  const auto node = backward_node(input, weight, bias, eps, activation, activation_param);
  Tensor output;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = eval_op().call(input, weight, bias, running_mean, running_var, counters, eps, activation,
                            activation_param);
  }
  bump_versions({&counters});
  if (node) {
    torch::autograd::set_history(output, node);
    save_parameters(*node, input, weight, bias);
    node->train = false;
    node->running_mean_ = SavedVariable(running_mean, false);
    node->running_var_ = SavedVariable(running_var, false);
  }
  return output;
}

// forward_train's output alone: see ops.cpp.
Tensor batch_norm_train(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                        const OptionalTensor& running_mean, const OptionalTensor& running_var,
                        const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
                        std::optional<double> momentum, double eps, int64_t activation, double activation_param) {
  return std::get<0>(train_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                                     momentum, eps, activation, activation_param));
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, CompositeImplicitAutograd, m) { m.impl("batch_norm_train", &batch_norm_train); }

TORCH_LIBRARY_IMPL(safebn, Autograd, m) {
  m.impl("forward_train", &forward_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace safebn
