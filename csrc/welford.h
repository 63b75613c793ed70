// Per-channel math shared by the CPU and CUDA kernels. Everything here is
// host+device so that the CPU tests exercise the exact formulas the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAFEBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SAFEBN_HOST_DEVICE inline
#endif

namespace safebn {

// Running mean and sum of squared deviations of `count` values.
template <typename acc_t>
struct Welford {
  acc_t mean = 0;
  acc_t m2 = 0;
  acc_t count = 0;

  SAFEBN_HOST_DEVICE void add(acc_t x) {
    count += acc_t(1);
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  // Chan et al.'s parallel merge: exact for any split of the data, and stable
  // when the two halves have very different means or sizes.
  SAFEBN_HOST_DEVICE void merge(const Welford& other) {
    if (other.count == acc_t(0)) return;
    if (count == acc_t(0)) {
      *this = other;
      return;
    }
    const acc_t total = count + other.count;
    const acc_t delta = other.mean - mean;
    const acc_t other_share = other.count / total;
    mean += delta * other_share;
    m2 += other.m2 + delta * delta * count * other_share;
    count = total;
  }

  // Biased variance: the one batch norm normalizes with.
  SAFEBN_HOST_DEVICE acc_t variance() const {
    return count > acc_t(0) ? m2 / count : acc_t(NAN);
  }
};

template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t invstd_from_var(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// Inverse of invstd_from_var, for the running-variance update, which is fed
// the saved invstd. Clamped because rounding can make a zero variance negative.
template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t var_from_invstd(acc_t invstd, acc_t eps) {
  const acc_t var = acc_t(1) / (invstd * invstd) - eps;
  return var > acc_t(0) ? var : acc_t(0);
}

// y = (x - mean) * invstd * weight + bias, written as (x - mean) * scale + bias
// so that a large common offset cancels before it is scaled.
template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t normalize_value(acc_t x, acc_t mean, acc_t scale, acc_t bias) {
  return (x - mean) * scale + bias;
}

// Per-channel constants of the input gradient:
//   dx = (dy - mean_dy - (x - mean) * proj) * scale
// with scale = weight * invstd, and in training mean_dy = sum(dy) / M and
// proj = sum(dy * (x - mean)) * invstd^2 / M (zero for both in eval mode,
// where the statistics are constants). `shift` is the bias: with an
// activation after the batch norm, its output (x - mean) * scale + shift is
// recomputed for the activation's derivative, which dy is multiplied by.
template <typename acc_t>
struct GradInputCoefficients {
  acc_t mean;
  acc_t scale;
  acc_t shift;
  acc_t mean_dy;
  acc_t proj;
};

template <typename acc_t>
SAFEBN_HOST_DEVICE GradInputCoefficients<acc_t> grad_input_coefficients(
    acc_t mean, acc_t invstd, acc_t weight, acc_t bias, acc_t sum_dy, acc_t sum_dy_xmu,
    acc_t count, bool train) {
  GradInputCoefficients<acc_t> k;
  k.mean = mean;
  k.scale = weight * invstd;
  k.shift = bias;
  k.mean_dy = train ? sum_dy / count : acc_t(0);
  k.proj = train ? sum_dy_xmu * invstd * invstd / count : acc_t(0);
  return k;
}

template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t grad_input_value(
    acc_t dy, acc_t x, const GradInputCoefficients<acc_t>& k) {
  return (dy - k.mean_dy - (x - k.mean) * k.proj) * k.scale;
}

// Exponential moving average of a running statistic, as nn.BatchNorm does it.
template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t blend(acc_t running, acc_t batch, acc_t factor) {
  return (acc_t(1) - factor) * running + factor * batch;
}

// Variance with Bessel's correction, which the running variance tracks.
template <typename acc_t>
SAFEBN_HOST_DEVICE acc_t unbiased_var(acc_t biased_var, int64_t count) {
  return biased_var * acc_t(count) / acc_t(count - 1);
}

}  // namespace safebn
