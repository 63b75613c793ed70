// The operator schemas of namespace safebn, declared once. Device kernels
// register in cpu/ and cuda/, the autograd of the two forwards in
// autograd.cpp; fake kernels, the fallback and the host's observe kernel in
// torch_safebn/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(safebn, m) {
  // A training forward in one call: the batch's statistics, the normalized
  // output, and the guarded update of the running buffers and the counters
  // (all or nothing: a batch with a non-finite statistic or parameter, or one
  // whose update would overflow the buffers' dtype, leaves every buffer as it
  // was), as aten::_batch_norm_with_update updates its buffers. Every
  // forward and backward takes an activation fused after the batch norm
  // (torch_safebn/activations.py: 0 is none).
  m.def("forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, float? momentum, "
        "float eps, int activation=0, float activation_param=0.) -> (Tensor output, Tensor mean, Tensor invstd)");
  // forward_train's output alone: what the modules call. Its statistics stay
  // in C++, saved for the backward; returned to Python, they would outlive
  // their Python objects and cost a GIL round trip each when the graph frees
  // them.
  m.def("batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, float? momentum, "
        "float eps, int activation=0, float activation_param=0.) -> Tensor");
  // An eval forward with the running statistics, which it checks (and counts
  // what it finds) when counters are given.
  m.def("batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
        "Tensor(a!)? counters, float eps, int activation=0, float activation_param=0.) -> Tensor");
  // Both forwards' backward: train uses the batch's statistics (mean, invstd),
  // eval the running ones as constants; with an activation, the batch norm's
  // output is recomputed from input, weight, bias, mean and invstd.
  m.def("backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
        "bool train, bool[3] output_mask, int activation=0, float activation_param=0.) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // The pieces of a batch norm whose statistics span several processes
  // (SafeSyncBatchNorm): per-process statistics, normalization with given
  // statistics, the backward split around the all-reduce of its two sums, and
  // the guarded update with the group's statistics.
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("normalize(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor");
  m.def("backward_reduce(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def("backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
        "Tensor sum_dy, Tensor sum_dy_xmu, SymInt count) -> Tensor");
  m.def("update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, Tensor mean, Tensor invstd, "
        "Tensor? weight, Tensor? bias, SymInt count, float eps, float? momentum, bool single_sample=False) -> ()");
  // batch_norm_eval's check alone, for code that normalizes with other ops
  // (the compiled path, torch_safebn/lowering.py).
  m.def("check_running_stats(Tensor(a!) counters, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps) -> ()");

  // The host's response to a module's counters inside compiled code: raise,
  // warn or count as the module's policy says (torch_safebn/safety.py). Its
  // kernel is Python; it marks what it reported in the counters, which is
  // what makes it an op the compiler keeps and orders.
  m.def("observe(Tensor(a!) counters, int module, SymInt[] shape, int event) -> ()");
}
