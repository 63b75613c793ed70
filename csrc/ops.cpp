// The operator schemas (namespace safebn) and the argument checks every device
// shares. Device implementations register in cpu/ and cuda/; fake kernels and
// autograd formulas are registered from torch_safebn/_ops.py.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"

namespace safebn {

void check_input(const at::Tensor& input) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "batch norm expects a floating-point input (float32, float64, float16 or bfloat16), "
              "got ", input.scalar_type(), ". Convert the input with .float() first.");
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5,
              "batch norm expects an input of 2 to 5 dimensions (N, C, ...), got ", input.dim(),
              " dimensions with shape ", input.sizes(), ".");
}

void check_channel_tensor(const at::Tensor& t, const at::Tensor& input, const char* name) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, name, " must have one value per channel: expected shape [",
              channels, "] for an input of shape ", input.sizes(), ", got ", t.sizes(),
              ". Check num_features of the module against the input's dimension 1.");
  TORCH_CHECK(t.device() == input.device(), name, " is on ", t.device(), " but the input is on ",
              input.device(), ". Move the module and the input to the same device.");
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == at::kFloat ||
                  t.scalar_type() == at::kDouble,
              name, " has dtype ", t.scalar_type(), ", which does not go with an input of dtype ",
              input.scalar_type(), ": use the input's dtype or float32.");
}

void check_channel_tensor(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (t.has_value() && t->defined()) check_channel_tensor(*t, input, name);
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps,
              ": it keeps 1 / sqrt(var + eps) finite for a constant channel. The usual value is 1e-5.");
}

void check_update_args(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must be given together");
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value() || !running_mean.has_value(),
              "momentum=None (a cumulative average) needs num_batches_tracked");
}

static std::optional<at::MemoryFormat> kernel_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return std::nullopt;
}

at::Tensor with_kernel_layout(const at::Tensor& input) {
  return kernel_memory_format(input).has_value() ? input : input.contiguous();
}

at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  const at::MemoryFormat format = *kernel_memory_format(like);
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

Geometry geometry_of(const at::Tensor& input) {
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.spatial *= input.size(d);
  // [N, C] is walked as rows of C channels, the better vectorized of the two.
  g.channels_last = input.dim() == 2 || *kernel_memory_format(input) != at::MemoryFormat::Contiguous;
  return g;
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor channel_stat_tensor(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(accumulate_type(input.scalar_type())));
}

at::Tensor undefined_channel_stats(const at::Tensor& input) { return channel_stat_tensor(input).fill_(NAN); }

// forward_eval, then check_eval_stats when counters are given, on whatever
// device: below autograd, so that neither goes through forward_eval's Python
// autograd wrapper (the op is not differentiable; functional.py calls it
// where no gradient is wanted).
at::Tensor forward_inference(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                             const at::Tensor& running_var, double eps, const std::optional<at::Tensor>& counters) {
  static const auto forward_eval =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::forward_eval", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, double)>();
  static const auto check_eval_stats =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("safebn::check_eval_stats", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, double)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor output = forward_eval.call(input, weight, bias, running_mean, running_var, eps);
  if (counters.has_value()) check_eval_stats.call(*counters, running_mean, running_var, weight, bias, eps);
  return output;
}

TORCH_LIBRARY(safebn, m) {
  // Differentiable (functional) ops; autograd is registered in _ops.py.
  m.def("forward_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor output, Tensor mean, Tensor invstd)");
  m.def("forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, float eps) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
        "bool train, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The pieces of a batch norm whose statistics span several processes
  // (SafeSyncBatchNorm): per-process statistics, normalization with given
  // statistics, and the backward split around the all-reduce of its two sums.
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("normalize(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor");
  m.def("backward_reduce(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def("backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
        "Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor");
  // Mutating ops, outside autograd. With counters, they guard: no non-finite
  // value reaches a running buffer and every decision is counted on the device.
  m.def("update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, Tensor mean, Tensor invstd, "
        "Tensor? weight, Tensor? bias, int count, float eps, float? momentum) -> ()");
  m.def("check_eval_stats(Tensor(a!) counters, Tensor running_mean, Tensor running_var, "
        "Tensor? weight, Tensor? bias, float eps) -> ()");
  // forward_eval where no gradient is wanted, with check_eval_stats when
  // counters are given: one dispatch and no autograd wrapper, which on a small
  // input cost more than the kernels.
  m.def("forward_inference(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, float eps, Tensor(a!)? counters) -> Tensor");
}

TORCH_LIBRARY_IMPL(safebn, CompositeExplicitAutograd, m) { m.impl("forward_inference", &forward_inference); }

}  // namespace safebn

// `import torch_safebn._C` loads this library, which runs the registrations
// above; the module itself defines no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
