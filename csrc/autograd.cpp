// Autograd of batch_norm_train and batch_norm_eval, in C++ on the Autograd
// key: one node per call whose backward is one call of safebn::backward. The
// forward redispatches below autograd, and everything either direction calls
// goes through the dispatcher to ops with fake kernels, so that AOTAutograd
// traces it like any ATen op. (torch.library.register_autograd refuses
// mutable ops, and its Python wrapper alone cost more than a small batch's
// kernels.)
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
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

namespace safebn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;

// ---- the ops below autograd, looked up once -------------------------------------

const auto& train_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::batch_norm_train", "")
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

// ---- helpers ----------------------------------------------------------------

bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->requires_grad(); }

bool wants_grad(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias) {
  return torch::autograd::GradMode::is_enabled() &&
         (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
}

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

// Which of (input, weight, bias) want a gradient. Undefined optional inputs
// have no edge, so the edges of weight and bias shift when one is absent.
std::array<bool, 3> output_mask(AutogradContext* ctx, bool has_weight, bool has_bias) {
  size_t edge = 0;
  const bool input = ctx->needs_input_grad(edge++);
  const bool weight = has_weight && ctx->needs_input_grad(edge++);
  const bool bias = has_bias && ctx->needs_input_grad(edge++);
  return {input, weight, bias};
}

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

// The gradients for backward(create_graph=True): those of the forward
// recomputed in ATen ops, as a graph, so that second derivatives see the
// batch statistics' dependence on the input.
variable_list composite_gradients(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                  const Tensor& bias, const Tensor& running_mean, const Tensor& running_var,
                                  double eps, bool train, ActivationArg activation, std::array<bool, 3> mask) {
  const std::array<Tensor, 3> arguments{input, weight, bias};
  variable_list wanted;
  for (size_t i = 0; i < 3; ++i)
    if (mask[i]) wanted.push_back(arguments[i]);
  const Tensor output = composite_forward(input, weight, bias, running_mean, running_var, eps, train, activation);
  variable_list grads = torch::autograd::grad({output}, wanted, {grad_output}, /*retain_graph=*/true,
                                              /*create_graph=*/true, /*allow_unused=*/true);
  variable_list all(3);
  for (size_t i = 0, next = 0; i < 3; ++i)
    if (mask[i]) all[i] = grads[next++];
  return all;
}

// The saved forward and its arguments, as both nodes keep them.
struct Saved {
  Tensor input, weight, bias, mean, invstd, running_mean, running_var;
};

variable_list gradients(AutogradContext* ctx, const variable_list& grad_outputs, const Saved& saved, bool train) {
  const Tensor& grad_output = grad_outputs[0];
  const std::array<bool, 3> mask = output_mask(ctx, saved.weight.defined(), saved.bias.defined());
  if (!grad_output.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
  const double eps = ctx->saved_data["eps"].toDouble();
  const ActivationArg activation{Activation(ctx->saved_data["activation"].toInt()),
                                 ctx->saved_data["activation_param"].toDouble()};
  if (torch::autograd::GradMode::is_enabled()) {
    variable_list grads = composite_gradients(grad_output, saved.input, saved.weight, saved.bias, saved.running_mean,
                                              saved.running_var, eps, train, activation, mask);
    grads.push_back(Tensor());
    return grads;
  }
  // safebn::backward has no derivative: skip its autograd fallback.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [grad_input, grad_weight, grad_bias] =
      backward_op().call(grad_output, saved.input, optional(saved.weight), optional(saved.bias), saved.mean,
                         saved.invstd, train, mask, int64_t(activation.kind), activation.param);
  return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor(),
          Tensor()};
}

void save_activation(AutogradContext* ctx, double eps, int64_t activation, double activation_param) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["activation_param"] = activation_param;
  ctx->set_materialize_grads(false);
}

// ---- training -----------------------------------------------------------------

// The arguments autograd does not see: mutated buffers and scalars.
struct TrainBuffers {
  OptionalTensor running_mean, running_var, num_batches_tracked, counters;
  std::optional<double> momentum;
  double eps;
  int64_t activation;
  double activation_param;
};

class BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const TrainBuffers& b) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, invstd] =
        train_op().call(input, weight, bias, b.running_mean, b.running_var, b.num_batches_tracked, b.counters,
                        b.momentum, b.eps, b.activation, b.activation_param);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    ctx->mark_non_differentiable({mean, invstd});
    save_activation(ctx, b.eps, b.activation, b.activation_param);
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    return gradients(ctx, grad_outputs, Saved{s[0], s[1], s[2], s[3], s[4], Tensor(), Tensor()}, /*train=*/true);
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps, int64_t activation, double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  std::tuple<Tensor, Tensor, Tensor> result;
  if (wants_grad(input, weight, bias)) {
    const variable_list out = BatchNormTrain::apply(input, weight, bias,
                                                    TrainBuffers{running_mean, running_var, num_batches_tracked,
                                                                 counters, momentum, eps, activation, activation_param});
    result = {out[0], out[1], out[2]};
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = train_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                             momentum, eps, activation, activation_param);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked, &counters});
  return result;
}

// ---- eval ---------------------------------------------------------------------

struct EvalBuffers {
  Tensor running_mean, running_var;
  OptionalTensor counters;
  double eps;
  int64_t activation;
  double activation_param;
};

class BatchNormEval : public torch::autograd::Function<BatchNormEval> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const EvalBuffers& b) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor output = eval_op().call(input, weight, bias, b.running_mean, b.running_var, b.counters, b.eps,
                                   b.activation, b.activation_param);
    ctx->save_for_backward(
        {input, weight.value_or(Tensor()), bias.value_or(Tensor()), b.running_mean, b.running_var});
    save_activation(ctx, b.eps, b.activation, b.activation_param);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &input = s[0], &running_mean = s[3], &running_var = s[4];
    const at::ScalarType acc = accumulate_type(input.scalar_type());
    const Tensor mean = running_mean.to(acc);
    const Tensor invstd = at::rsqrt(running_var.to(acc) + ctx->saved_data["eps"].toDouble());
    return gradients(ctx, grad_outputs, Saved{input, s[1], s[2], mean, invstd, running_mean, running_var},
                     /*train=*/false);
  }
};

Tensor batch_norm_eval_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                const Tensor& running_mean, const Tensor& running_var, const OptionalTensor& counters,
                                double eps, int64_t activation, double activation_param) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  Tensor output;
  if (wants_grad(input, weight, bias)) {
    output = BatchNormEval::apply(input, weight, bias,
                                  EvalBuffers{running_mean, running_var, counters, eps, activation, activation_param})[0];
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = eval_op().call(input, weight, bias, running_mean, running_var, counters, eps, activation,
                            activation_param);
  }
  bump_versions({&counters});
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace safebn
