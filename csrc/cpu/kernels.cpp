// Compiles kernel_impl.h twice: for the x86-64 baseline and for AVX2 + FMA +
// F16C, and picks one at run time. The build itself never assumes an ISA
// (no -march=native), so the wheel runs on any x86-64 processor.
#include "kernels.h"

#include <algorithm>
#include <array>
#include <vector>

namespace safebn {
namespace cpu {

namespace baseline {
#include "kernel_impl.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__)
#define SAFEBN_HAVE_AVX2_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "kernel_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

static bool use_avx2() {
#ifdef SAFEBN_HAVE_AVX2_KERNELS
  static const bool supported = __builtin_cpu_supports("avx2") &&
                                __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

const char* kernel_isa() { return use_avx2() ? "avx2" : "baseline"; }

template <typename T>
const KernelTable<T>& kernels() {
#ifdef SAFEBN_HAVE_AVX2_KERNELS
  static const KernelTable<T> table = use_avx2() ? avx2::make_table<T>() : baseline::make_table<T>();
#else
  static const KernelTable<T> table = baseline::make_table<T>();
#endif
  return table;
}

template const KernelTable<float>& kernels<float>();
template const KernelTable<double>& kernels<double>();
template const KernelTable<bf16>& kernels<bf16>();
template const KernelTable<f16>& kernels<f16>();

}  // namespace cpu
}  // namespace safebn
