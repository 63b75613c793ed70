// The activations fused into batch norm: y = act(z) with z = bn(x), and the
// derivative dy/dz that the backward applies to the incoming gradient before
// the batch-norm backward, with z recomputed from x, mean and invstd rather
// than saved. Host+device: the CPU and CUDA kernels apply the same formulas.
#pragma once

#include <cmath>
#include <cstdint>

#include "activation_math.h"
#include "contract.h"
#include "welford.h"

namespace safebn {

// An op's activation: its `activation` and `activation_param` arguments.
struct ActivationArg {
  Activation kind = Activation::kIdentity;
  double param = 0;
};

template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + math::exp(-z));
}

// forward(z, p) and derivative(z, p) for each activation, p its parameter.
// The derivatives at kinks are torch's: relu'(0) = 0, relu6' is 0 at 0 and
// 6, leaky_relu'(0) = slope, hardswish' is 0 at -3 and 1 at 3. A NaN z stays
// NaN through every forward, as through torch's activations: the comparisons
// send a NaN down the branch that returns z.
struct Identity {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) { return z; }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t, acc_t) { return acc_t(1); }
};

struct Relu {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) { return z < acc_t(0) ? acc_t(0) : z; }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t) { return z > acc_t(0) ? acc_t(1) : acc_t(0); }
};

struct Relu6 {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) {
    return z < acc_t(0) ? acc_t(0) : (z > acc_t(6) ? acc_t(6) : z);
  }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t) {
    return z > acc_t(0) && z < acc_t(6) ? acc_t(1) : acc_t(0);
  }
};

struct LeakyRelu {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t slope) { return z > acc_t(0) ? z : z * slope; }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t slope) { return z > acc_t(0) ? acc_t(1) : slope; }
};

struct Silu {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) { return z * sigmoid(z); }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t) {
    const acc_t s = sigmoid(z);
    return s * (acc_t(1) + z * (acc_t(1) - s));
  }
};

// x P(X <= x) for a standard normal X, the CDF written as erfc(-x / sqrt 2) / 2,
// which keeps its relative precision in the negative tail.
struct Gelu {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t cdf(acc_t z) { return acc_t(0.5) * math::erfc(-z * acc_t(M_SQRT1_2)); }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) { return z * cdf(z); }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t) {
    const acc_t pdf = math::exp(acc_t(-0.5) * z * z) * acc_t(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    return cdf(z) + z * pdf;
  }
};

// The tanh approximation 0.5 z (1 + tanh(u)), u = sqrt(2 / pi) (z + 0.044715 z^3),
// written as z sigmoid(2u): the same function, without 1 + tanh's cancellation.
struct GeluTanh {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t inner(acc_t z) {
    return acc_t(M_SQRT2 * M_2_SQRTPI * 0.5) * (z + acc_t(0.044715) * z * z * z);
  }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) { return z * sigmoid(acc_t(2) * inner(z)); }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t) {
    const acc_t s = sigmoid(acc_t(2) * inner(z));
    const acc_t d_inner = acc_t(M_SQRT2 * M_2_SQRTPI * 0.5) * (acc_t(1) + acc_t(3 * 0.044715) * z * z);
    return s + acc_t(2) * z * s * (acc_t(1) - s) * d_inner;
  }
};

struct Hardswish {
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t forward(acc_t z, acc_t) {
    if (z <= acc_t(-3)) return acc_t(0);
    if (z >= acc_t(3)) return z;
    return z * (z + acc_t(3)) / acc_t(6);
  }
  template <typename acc_t>
  static SAFEBN_HOST_DEVICE acc_t derivative(acc_t z, acc_t) {
    if (z <= acc_t(-3)) return acc_t(0);
    if (z >= acc_t(3)) return acc_t(1);
    return (acc_t(2) * z + acc_t(3)) / acc_t(6);
  }
};

// y = act(bn(x)) from the normalization's constants.
template <typename Act, typename acc_t>
SAFEBN_HOST_DEVICE acc_t normalize_activate(acc_t x, acc_t mean, acc_t scale, acc_t shift, acc_t param) {
  return Act::forward(normalize_value(x, mean, scale, shift), param);
}

// The gradient with respect to the batch norm's output z = (x - mean) *
// scale + shift, from the gradient dy with respect to act(z), z recomputed.
// For Identity it is dy, and z is never computed.
template <typename Act, typename acc_t>
SAFEBN_HOST_DEVICE acc_t grad_before_activation(acc_t dy, acc_t x, acc_t mean, acc_t scale, acc_t shift,
                                                acc_t param) {
  return dy * Act::derivative(normalize_value(x, mean, scale, shift), param);
}

// The activations by code (contract.def): each case names its struct above.
#define SAFEBN_COUNTER(name, meaning)

// act(z) and act'(z) for an activation chosen at run time, as the CUDA
// kernels take it; the CPU kernels are templates, which vectorize.
template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t activate(Activation kind, acc_t z, acc_t param) {
  switch (kind) {
#define SAFEBN_ACTIVATION(name, text) \
  case Activation::k##name:           \
    return name::forward(z, param);
#include "contract.def"
#undef SAFEBN_ACTIVATION
    default: return z;
  }
}

template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t activation_derivative(Activation kind, acc_t z, acc_t param) {
  switch (kind) {
#define SAFEBN_ACTIVATION(name, text) \
  case Activation::k##name:           \
    return name::derivative(z, param);
#include "contract.def"
#undef SAFEBN_ACTIVATION
    default: return acc_t(1);
  }
}

// Calls fn(Act{}) with the activation type for `code`.
template <typename Fn>
decltype(auto) with_activation(Activation code, Fn fn) {
  switch (code) {
#define SAFEBN_ACTIVATION(name, text) \
  case Activation::k##name:           \
    return fn(name{});
#include "contract.def"
#undef SAFEBN_ACTIVATION
    default: return fn(Identity{});
  }
}

#undef SAFEBN_COUNTER

}  // namespace safebn
