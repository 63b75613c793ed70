// Compiles kernel_impl.h once per instruction set: the x86-64 baseline, AVX2
// + FMA + F16C, and AVX-512 (F, BW, VL, DQ) with 512-bit vectors, and picks
// the best one this processor supports at run time. The build itself never
// assumes an ISA (no -march=native), so the wheel runs on any x86-64
// processor. AVX-512's width pays where a fused activation makes the loops
// arithmetic-bound (exp in SiLU and GELU).
#include "kernels.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace safebn {
namespace cpu {

// Each instruction set's kVectorBytes, the width of its vector registers,
// and NonTemporal: store(dst, src) copies kBytes from src
// to dst, which is aligned to kBytes, without reading dst's cache line from
// memory first; fence() orders those stores before whatever follows. kBytes
// 0: the processor has none, and Store::kStreamed writes as kCached does.
namespace baseline {
constexpr int64_t kVectorBytes = 16;
#if defined(__x86_64__)
struct NonTemporal {  // SSE2, in every x86-64 processor
  static constexpr int64_t kBytes = 16;
  static void store(char* dst, const char* src) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  static void fence() { _mm_sfence(); }
};
#else
struct NonTemporal {
  static constexpr int64_t kBytes = 0;
  static void store(char*, const char*) {}
  static void fence() {}
};
#endif
#include "kernel_impl.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__)
#define SAFEBN_HAVE_X86_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int64_t kVectorBytes = 32;
struct NonTemporal {
  static constexpr int64_t kBytes = 32;
  static void store(char* dst, const char* src) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
  static void fence() { _mm_sfence(); }
};
#include "kernel_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")
namespace avx512 {
constexpr int64_t kVectorBytes = 64;
struct NonTemporal {
  static constexpr int64_t kBytes = 64;
  static void store(char* dst, const char* src) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
  }
  static void fence() { _mm_sfence(); }
};
#include "kernel_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa best_isa() {
#ifdef SAFEBN_HAVE_X86_KERNELS
  static const Isa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace

const char* kernel_isa() {
  switch (best_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

template <typename T>
const KernelTable<T>& kernels(Activation activation) {
  static const auto tables = [] {
#ifdef SAFEBN_HAVE_X86_KERNELS
    if (best_isa() == Isa::kAvx512) return avx512::make_tables<T>();
    if (best_isa() == Isa::kAvx2) return avx2::make_tables<T>();
#endif
    return baseline::make_tables<T>();
  }();
  return tables[size_t(activation)];
}

template const KernelTable<float>& kernels<float>(Activation);
template const KernelTable<double>& kernels<double>(Activation);
template const KernelTable<bf16>& kernels<bf16>(Activation);
template const KernelTable<f16>& kernels<f16>(Activation);

}  // namespace cpu
}  // namespace safebn
