// exp and erfc as the fused activations use them (activation.h). On
// the host, float is computed in plain arithmetic, which the compiler
// vectorizes with the loops around it: libm's functions would cost a call
// per value and keep the loop scalar. Double, and every type on the GPU,
// use the standard functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "welford.h"

namespace safebn {
namespace math {

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)

SAFEBN_HOST_DEVICE float exp(float x) { return ::expf(x); }
SAFEBN_HOST_DEVICE float erfc(float x) { return ::erfcf(x); }

#else

// Cephes' expf: e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2,
// e^r by a degree-7 polynomial; relative error below 2e-7. The input is
// clamped where 2^n stays a normal float (the results there are within 2e-38
// of 0, or near FLT_MAX instead of inf), NaN stays NaN.
inline float exp(float x) {
  const float clamped = x != x ? 0.0f : (x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x != x ? x : p * scale;
}

// Numerical Recipes' Chebyshev fit t e^(-z^2 + P(t)), t = 1 / (1 + z / 2),
// z = |x|: relative error below 1.2e-7 for x >= 0, and erfc(x) = 2 - erfc(-x)
// below. Relative precision in the tail is what GELU's 0.5 (1 + erf(x)) =
// 0.5 erfc(-x) needs for large negative x.
inline float erfc(float x) {
  const float z = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float tail = t * exp(-z * z + p);
  return x >= 0.0f ? tail : 2.0f - tail;
}

#endif

SAFEBN_HOST_DEVICE double exp(double x) { return std::exp(x); }
SAFEBN_HOST_DEVICE double erfc(double x) { return std::erfc(x); }

}  // namespace math
}  // namespace safebn
