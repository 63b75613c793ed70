// Batch norm written in ATen ops, which autograd differentiates in every mode
// (double backward, forward AD) and compilers see through.
#pragma once

#include <ATen/core/Tensor.h>

#include "activation.h"

namespace safebn {

// act(z), the safebn::activation op.
at::Tensor activate(const at::Tensor& z, ActivationArg activation);

// act(bn(x)) with the batch's statistics recomputed from the input (train) or
// the running ones as constants (eval); weight and bias may be undefined.
at::Tensor composite_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool train,
                             ActivationArg activation);

}  // namespace safebn
