// Storage types of the CPU kernels and their conversions to the accumulation
// type. The kernels see raw storage rather than c10::BFloat16/c10::Half so that
// conversions are plain bit operations the compiler vectorizes per ISA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace safebn {
namespace cpu {

struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;  // IEEE binary16, the layout of c10::Half

template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_type = typename AccumulateType<T>::type;

inline float load(bf16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float load(f16 v) { return float(v); }
inline float load(float v) { return v; }
inline double load(double v) { return v; }

// Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
inline void store(bf16* p, float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->bits = f != f ? uint16_t(0x7fc0) : uint16_t(rounded);
}
inline void store(f16* p, float f) { *p = f16(f); }
inline void store(float* p, float f) { *p = f; }
inline void store(double* p, double f) { *p = f; }

}  // namespace cpu
}  // namespace safebn
