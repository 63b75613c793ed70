// The ops written in ATen ops (CompositeImplicitAutograd): what autograd,
// fake tensors and compilers trace through (composite.h).
#include "composite.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
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
                             ActivationArg activation, int64_t virtual_batch_size) {
  if (train && virtual_batch_size > 0) {
    std::vector<at::Tensor> parts;
    for (int64_t part = 0; part < chunk_count(input.size(0), virtual_batch_size); ++part)
      parts.push_back(composite_forward(chunk_of(input, part, virtual_batch_size), weight, bias, running_mean,
                                        running_var, eps, train, activation));
    return at::cat(parts);
  }
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

std::tuple<at::Tensor, at::Tensor> pooled_statistics(const at::Tensor& mean, const at::Tensor& invstd,
                                                     const at::Tensor& input, int64_t virtual_batch_size, double eps) {
  // every chunk holds virtual_batch_size examples but the last
  const int64_t chunks = mean.size(0), batch = input.size(0);
  const double total = double(batch);
  at::Tensor share = at::full({chunks, 1}, double(virtual_batch_size) / total, mean.options());
  share.narrow(0, chunks - 1, 1).fill_(double(batch - (chunks - 1) * virtual_batch_size) / total);
  const at::Tensor var = (invstd.square().reciprocal() - eps).clamp_min(0);
  const at::Tensor pooled_mean = (share * mean).sum(0);
  const at::Tensor pooled_var = (share * (var + (mean - pooled_mean).square())).sum(0);
  return {pooled_mean, (pooled_var + eps).rsqrt()};
}

namespace {

using OptionalTensor = std::optional<at::Tensor>;

at::Tensor activation_op(const at::Tensor& z, int64_t activation, double activation_param) {
  return activate(z, activation_arg(activation, activation_param));
}

// forward_train's output alone (ops.def).
at::Tensor batch_norm_train(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
                            std::optional<double> momentum, double eps, int64_t activation,
                            double activation_param, c10::SymInt virtual_batch_size) {
  static const auto train_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::forward_train", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
              const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, std::optional<double>, double,
              int64_t, double, c10::SymInt)>();
  return std::get<0>(train_op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                                   momentum, eps, activation, activation_param, std::move(virtual_batch_size)));
}

}  // namespace

TORCH_LIBRARY_IMPL(safebn, CompositeImplicitAutograd, m) {
  m.impl("activation", &activation_op);
  m.impl("batch_norm_train", &batch_norm_train);
}

}  // namespace safebn
