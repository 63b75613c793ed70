// The ops written in ATen ops (CompositeImplicitAutograd): what autograd,
// fake tensors and compilers trace through (composite.h).
#include "composite.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "layout.h"

namespace safebn {

at::Tensor activate(const at::Tensor& z, ActivationArg activation) {
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

at::Tensor composite_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool train,
                             ActivationArg activation) {
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  std::vector<int64_t> dims{0}, shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  shape[1] = input.size(1);
  const at::Tensor x = input.to(acc);
  at::Tensor mean, var;
  if (train) {  // (two means rather than var_mean, which warns of an empty batch's 0 degrees of freedom)
    mean = x.mean(dims, /*keepdim=*/true);
    var = (x - mean).square().mean(dims, /*keepdim=*/true);
  } else {
    mean = running_mean.to(acc).view(shape);
    var = running_var.to(acc).view(shape);
  }
  at::Tensor z = (x - mean) * at::rsqrt(var + eps);
  if (weight.defined()) z = z * weight.to(acc).view(shape);
  if (bias.defined()) z = z + bias.to(acc).view(shape);
  return activate(z, activation).to(input.scalar_type());
}

namespace {

using OptionalTensor = std::optional<at::Tensor>;

at::Tensor activation_op(const at::Tensor& z, int64_t activation, double activation_param) {
  return activate(z, activation_arg(activation, activation_param));
}

// forward_train's output alone (contract.def).
at::Tensor batch_norm_train(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
                            std::optional<double> momentum, double eps, int64_t activation,
                            double activation_param) {
  static const auto train_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::forward_train", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
              const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, std::optional<double>, double,
              int64_t, double)>();
  return std::get<0>(train_op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                                   momentum, eps, activation, activation_param));
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, CompositeImplicitAutograd, m) {
  m.impl("activation", &activation_op);
  m.impl("batch_norm_train", &batch_norm_train);
}

}  // namespace safebn
