// Storage types of the CPU kernels and their conversions to the accumulation
// type. The kernels see raw storage rather than c10::BFloat16/c10::Half so that
// conversions are plain bit operations the compiler vectorizes per ISA.
#pragma once

#include <array>
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

// memcpy rather than std::bit_cast: torch before 2.12 builds extensions as C++17.
template <typename To, typename From>
inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as reinterprets values of one size");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

inline float float_from_bits(uint32_t u) { return bits_as<float>(u); }

// The float's bits rounded to nearest even in the upper 16 bits, as
// c10::BFloat16 rounds; NaN becomes the quiet NaN 0x7fc0.
inline uint32_t bf16_rounded_bits(float f) {
  const uint32_t u = bits_as<uint32_t>(f);
  return f != f ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
}

inline float load(bf16 v) { return float_from_bits(uint32_t(v.bits) << 16); }
inline float load(f16 v) { return float(v); }
inline float load(float v) { return v; }
inline double load(double v) { return v; }

inline void store(bf16* p, float f) { p->bits = uint16_t(bf16_rounded_bits(f) >> 16); }
inline void store(f16* p, float f) { *p = f16(f); }
inline void store(float* p, float f) { *p = f; }
inline void store(double* p, double f) { *p = f; }

// How the kernels move values between storage and registers: `kValues` at a
// time, as one `Word`. ValueByValue is the plain way. Packing<T> is the
// fastest: for bfloat16, pairs, the two halves of a 32-bit word, which a
// shift and a mask widen to float where widening one value at a time takes a
// cross-lane shuffle per vector (half the speed on AVX2). A word's values all
// belong to one channel, or read their per-lane constants by their position
// in the word (kernels.h, LaneOrder).
template <typename T>
struct ValueByValue {
  using acc_t = acc_type<T>;
  using Word = T;
  static constexpr int kValues = 1;
  static std::array<acc_t, 1> unpack(Word w) { return {load(w)}; }
  static Word pack(const std::array<acc_t, 1>& v) {
    Word w;
    store(&w, v[0]);
    return w;
  }
};

template <typename T>
struct Packing : ValueByValue<T> {};

template <>
struct Packing<bf16> {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16 pairs assume little-endian words");
  using acc_t = float;
  using Word = uint32_t;
  static constexpr int kValues = 2;
  static std::array<float, 2> unpack(Word w) {
    return {float_from_bits(w << 16), float_from_bits(w & 0xffff0000u)};
  }
  static Word pack(const std::array<float, 2>& v) {
    return (bf16_rounded_bits(v[0]) >> 16) | (bf16_rounded_bits(v[1]) & 0xffff0000u);
  }
};

// Word i of the values at p (p need not be aligned).
template <typename P, typename T>
inline typename P::Word load_word(const T* p, int64_t i) {
  typename P::Word w;
  std::memcpy(&w, p + i * P::kValues, sizeof w);
  return w;
}
template <typename P, typename T>
inline void store_word(T* p, int64_t i, typename P::Word w) {
  std::memcpy(p + i * P::kValues, &w, sizeof w);
}

}  // namespace cpu
}  // namespace safebn
