// The CPU kernels' interface: loops over one slice of a batch-norm input,
// compiled once per instruction set (kernels.cpp) and chosen at run time.
// Parallelism and the per-channel bookkeeping live in batch_norm_cpu.cpp.
#pragma once

#include "../geometry.h"
#include "../welford.h"
#include "scalar_types.h"

namespace safebn {
namespace cpu {

// Contiguous layouts address a channel's values as its "plane": plane index
// i = n * S + s, so [begin, end) may start and stop mid-row. Channels-last
// layouts address rows of C values: [begin, end) is a range of rows.
template <typename T>
struct KernelTable {
  using acc_t = acc_type<T>;

  Welford<acc_t> (*plane_stats)(const T* x, const Geometry& g, int64_t c,
                                int64_t begin, int64_t end);
  void (*plane_normalize)(const T* x, T* y, const Geometry& g, int64_t c,
                          int64_t begin, int64_t end, acc_t mean, acc_t scale, acc_t bias);
  // Adds sum(dy) and sum(dy * (x - mean)) over the slice to the two totals.
  void (*plane_grad_sums)(const T* dy, const T* x, const Geometry& g, int64_t c,
                          int64_t begin, int64_t end, acc_t mean,
                          double* sum_dy, double* sum_dy_xmu);
  void (*plane_grad_input)(const T* dy, const T* x, T* dx, const Geometry& g, int64_t c,
                           int64_t begin, int64_t end, const GradInputCoefficients<acc_t>& k);

  // `stats` receives one Welford state per channel.
  void (*rows_stats)(const T* x, int64_t channels, int64_t begin, int64_t end,
                     Welford<acc_t>* stats);
  void (*rows_normalize)(const T* x, T* y, int64_t channels, int64_t begin, int64_t end,
                         const acc_t* mean, const acc_t* scale, const acc_t* bias);
  // Adds per-channel sum(dy) and sum(dy * (x - mean)) to the two arrays.
  void (*rows_grad_sums)(const T* dy, const T* x, int64_t channels, int64_t begin,
                         int64_t end, const acc_t* mean, double* sum_dy, double* sum_dy_xmu);
  void (*rows_grad_input)(const T* dy, const T* x, T* dx, int64_t channels, int64_t begin,
                          int64_t end, const GradInputCoefficients<acc_t>* k);
};

// The table for the best instruction set this processor supports.
template <typename T>
const KernelTable<T>& kernels();

// Name of the instruction set kernels() picked ("avx2" or "baseline").
const char* kernel_isa();

}  // namespace cpu
}  // namespace safebn
