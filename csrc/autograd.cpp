// Autograd of batch_norm_train and batch_norm_eval, in C++ on the Autograd
// key: one node per call whose backward is one call of safebn::backward. The
// forward redispatches below autograd, and everything either direction calls
// goes through the dispatcher to ops with fake kernels, so that AOTAutograd
// traces it like any ATen op. (torch.library.register_autograd refuses
// mutable ops, and its Python wrapper alone cost more than a small batch's
// kernels.)
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/rsqrt.h>
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
                                                    std::optional<double>, double)>();
  return op;
}

const auto& eval_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("safebn::batch_norm_eval", "")
                             .typed<Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                           const Tensor&, const Tensor&, const OptionalTensor&, double)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                    const Tensor&, const Tensor&, bool, std::array<bool, 3>)>();
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

// The gradients as a differentiable formula, for backward(create_graph=True):
// the statistics are recomputed from the input with ATen ops, so that second
// derivatives see their dependence on it. In eval mode the running statistics
// are constants.
std::tuple<Tensor, Tensor, Tensor> composite_backward(const Tensor& grad_output, const Tensor& input,
                                                      const Tensor& weight, const Tensor& running_mean,
                                                      const Tensor& running_var, double eps, bool train) {
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  std::vector<int64_t> dims{0}, shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  shape[1] = input.size(1);
  const Tensor x = input.to(acc), dy = grad_output.to(acc);
  Tensor mean, invstd;
  if (train) {
    auto [var, batch_mean] = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/true);
    mean = batch_mean;
    invstd = at::rsqrt(var + eps);
  } else {
    mean = running_mean.to(acc).view(shape);
    invstd = at::rsqrt(running_var.to(acc).view(shape) + eps);
  }
  const Tensor xhat = (x - mean) * invstd;
  const Tensor sum_dy = dy.sum(dims, /*keepdim=*/true), sum_dy_xhat = (dy * xhat).sum(dims, /*keepdim=*/true);
  const Tensor scale = weight.defined() ? invstd * weight.to(acc).view(shape) : invstd;
  Tensor grad_input = dy;
  if (train) {
    const double count = double(input.numel() / std::max<int64_t>(input.size(1), 1));
    grad_input = dy - sum_dy / count - xhat * (sum_dy_xhat / count);
  }
  return {(grad_input * scale).to(input.scalar_type()), sum_dy_xhat.flatten(), sum_dy.flatten()};
}

variable_list gradients(AutogradContext* ctx, const variable_list& grad_outputs, const Tensor& input,
                        const Tensor& weight, const Tensor& mean, const Tensor& invstd, const Tensor& running_mean,
                        const Tensor& running_var, bool train) {
  const Tensor& grad_output = grad_outputs[0];
  const std::array<bool, 3> mask =
      output_mask(ctx, weight.defined(), ctx->saved_data["has_bias"].toBool());
  if (!grad_output.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
  const double eps = ctx->saved_data["eps"].toDouble();
  Tensor grad_input, grad_weight, grad_bias;
  if (torch::autograd::GradMode::is_enabled()) {
    std::tie(grad_input, grad_weight, grad_bias) =
        composite_backward(grad_output, input, weight, running_mean, running_var, eps, train);
  } else {
    // safebn::backward has no derivative: skip its autograd fallback.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(grad_input, grad_weight, grad_bias) = backward_op().call(
        grad_output, input, weight.defined() ? OptionalTensor(weight) : std::nullopt, mean, invstd, train, mask);
  }
  return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor(),
          Tensor()};
}

// ---- training -----------------------------------------------------------------

// The arguments autograd does not see: mutated buffers and scalars.
struct TrainBuffers {
  OptionalTensor running_mean, running_var, num_batches_tracked, counters;
  std::optional<double> momentum;
  double eps;
};

class BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const TrainBuffers& b) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, invstd] = train_op().call(input, weight, bias, b.running_mean, b.running_var,
                                                  b.num_batches_tracked, b.counters, b.momentum, b.eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    ctx->saved_data["eps"] = b.eps;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({mean, invstd});
    ctx->set_materialize_grads(false);
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    return gradients(ctx, grad_outputs, saved[0], saved[1], saved[2], saved[3], Tensor(), Tensor(),
                     /*train=*/true);
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  std::tuple<Tensor, Tensor, Tensor> result;
  if (wants_grad(input, weight, bias)) {
    const variable_list out = BatchNormTrain::apply(
        input, weight, bias, TrainBuffers{running_mean, running_var, num_batches_tracked, counters, momentum, eps});
    result = {out[0], out[1], out[2]};
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = train_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                             momentum, eps);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked, &counters});
  return result;
}

// ---- eval ---------------------------------------------------------------------

struct EvalBuffers {
  Tensor running_mean, running_var;
  OptionalTensor counters;
  double eps;
};

class BatchNormEval : public torch::autograd::Function<BatchNormEval> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const EvalBuffers& b) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor output = eval_op().call(input, weight, bias, b.running_mean, b.running_var, b.counters, b.eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), b.running_mean, b.running_var});
    ctx->saved_data["eps"] = b.eps;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->set_materialize_grads(false);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &running_mean = saved[2], &running_var = saved[3];
    const at::ScalarType acc = accumulate_type(input.scalar_type());
    const Tensor mean = running_mean.to(acc);
    const Tensor invstd = at::rsqrt(running_var.to(acc) + ctx->saved_data["eps"].toDouble());
    return gradients(ctx, grad_outputs, input, saved[1], mean, invstd, running_mean, running_var, /*train=*/false);
  }
};

Tensor batch_norm_eval_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                const Tensor& running_mean, const Tensor& running_var, const OptionalTensor& counters,
                                double eps) {
  check_not_differentiated(running_mean, "running_mean");
  check_not_differentiated(running_var, "running_var");
  Tensor output;
  if (wants_grad(input, weight, bias)) {
    output = BatchNormEval::apply(input, weight, bias, EvalBuffers{running_mean, running_var, counters, eps})[0];
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = eval_op().call(input, weight, bias, running_mean, running_var, counters, eps);
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
