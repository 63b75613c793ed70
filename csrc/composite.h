// Batch norm written in ATen ops, which autograd differentiates in every mode
// (double backward, forward AD) and compilers see through.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "activation.h"

namespace safebn {

// act(z), the safebn::activation op.
at::Tensor activate(const at::Tensor& z, ActivationArg activation);

// act(bn(x)) with the batch's statistics recomputed from the input (train;
// per chunk for a ghost batch norm, layout.h) or the running ones as
// constants (eval); weight and bias may be undefined.
at::Tensor composite_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool train,
                             ActivationArg activation, int64_t virtual_batch_size = 0);

// The statistics of the whole batch (mean, invstd) from those of its chunks
// (a ghost batch norm's [chunks, C] mean and invstd): Chan's merge of each
// chunk's count, mean and biased variance, in the statistics' dtype.
std::tuple<at::Tensor, at::Tensor> pooled_statistics(const at::Tensor& mean, const at::Tensor& invstd,
                                                     const at::Tensor& input, int64_t virtual_batch_size, double eps);

}  // namespace safebn
