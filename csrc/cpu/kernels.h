// The CPU kernels' interface: loops over one slice of a batch-norm input,
// compiled once per instruction set (kernels.cpp) and chosen at run time.
// Parallelism and the per-channel bookkeeping live in batch_norm_cpu.cpp.
#pragma once

#include <algorithm>

#include "../activation.h"
#include "../geometry.h"
#include "../welford.h"
#include "scalar_types.h"

namespace safebn {
namespace cpu {

// A tensor walked in memory order as `rows` rows of `width` values, `stride`
// apart from `offset`; value j of a row belongs to channel
// (j / per_channel) % channels. Channels-last: rows of a few pixels' C
// values (per_channel 1). Contiguous with short runs: rows of one example's
// C * S values (per_channel S).
struct Blocks {
  int64_t offset = 0;
  int64_t rows = 0;
  int64_t stride = 0;
  int64_t width = 0;
  int64_t per_channel = 1;
  int64_t channels = 1;

  // fn(first, last, c) for each span [first, last) of the lanes in [begin,
  // end) that belong to one channel c, in order: S lanes of a contiguous
  // input's row, or one lane of a channels-last one.
  // Divides once: a division per span cost a channels-last row of 512
  // lanes more than its sums.
  template <typename Fn>
  void for_each_channel_span(int64_t begin, int64_t end, Fn fn) const {
    int64_t c = (begin / per_channel) % channels;
    int64_t last = std::min(end, (begin / per_channel + 1) * per_channel);
    for (int64_t first = begin; first < end; first = last, last = std::min(end, last + per_channel)) {
      fn(first, last, c);
      if (++c == channels) c = 0;
    }
  }
};

// The order in which the blocks kernels read the per-lane arrays of a row of
// `b`: a word of Packing<T> at a time when the width allows, each of its
// `values` from its own part of the array (lane j = i * values + k at
// k * words + i), so that every load of constants is contiguous.
struct LaneOrder {
  int64_t values = 1;
  int64_t words = 0;
  int64_t index(int64_t j) const { return (j % values) * words + j / values; }
};

template <typename T>
LaneOrder lane_order(const Blocks& b) {
  const int64_t values = b.width % Packing<T>::kValues == 0 ? Packing<T>::kValues : 1;
  return {values, b.width / values};
}

// A channel's values as sums of x - shift and (x - shift)^2 in double, the
// shift being one of its values (see kernel_impl.h).
struct ShiftedSums {
  double sum = 0, sum_sq = 0;
  int64_t count = 0;

  template <typename acc_t>
  Welford<acc_t> welford(acc_t shift) const {
    Welford<acc_t> w;
    if (count == 0) return w;
    const double mean = sum / double(count);
    w.count = acc_t(count);
    w.mean = acc_t(double(shift) + mean);
    const double m2 = sum_sq - sum * mean;
    w.m2 = acc_t(m2 < 0 ? 0.0 : m2);  // rounding can dip below 0; NaN stays NaN
    return w;
  }
};

// The input gradient's coefficients (welford.h) as one array per field, one
// entry per lane of a row.
template <typename acc_t>
struct GradInputLanes {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean_dy;
  const acc_t* proj;
};

// How an elementwise kernel writes its output. kCached: plain stores, which
// read each cache line not yet in cache from memory before writing it, and
// leave it in the caches. kStreamed: non-temporal stores, which write whole
// lines straight to memory: for an output too large to be read back from
// the cache anyway, a pass with one or two inputs then moves a third or a
// quarter fewer bytes, and its inputs stay in the last-level cache rather than
// making room for the output.
enum class Store { kCached, kStreamed };

// The kernels for one activation (activation.h): the normalizations write
// act((x - mean) * scale + bias), and the gradient's sums and the input
// gradient take dy times act' at that value, recomputed; `param` is the
// activation's parameter. The statistics do not depend on it.
template <typename T>
struct KernelTable {
  using acc_t = acc_type<T>;

  // Contiguous layouts, one channel's plane indices [begin, end) (i = n * S + s).
  Welford<acc_t> (*plane_stats)(const T* x, const Geometry& g, int64_t c, int64_t begin, int64_t end);
  void (*plane_normalize)(const T* x, T* y, const Geometry& g, int64_t c, int64_t begin, int64_t end,
                          acc_t mean, acc_t scale, acc_t bias, acc_t param, Store store);
  // Adds sum(dz) and sum(dz * (x - mean)) over the slice to the two totals;
  // every *_grad_sums also writes dz where `dz` is not null (see
  // stores_activation_grad).
  void (*plane_grad_sums)(const T* dy, const T* x, T* dz, const Geometry& g, int64_t c, int64_t begin,
                          int64_t end, acc_t mean, acc_t scale, acc_t bias, acc_t param, double* sum_dy,
                          double* sum_dy_xmu);
  void (*plane_grad_input)(const T* dy, const T* x, T* dx, const Geometry& g, int64_t c, int64_t begin,
                           int64_t end, const GradInputCoefficients<acc_t>& k, acc_t param, Store store);

  // Contiguous layouts, the (n, c) rows [begin, end) (row n * C + c), with
  // per-channel arrays; the sums are added to the outputs.
  void (*rows_stats)(const T* x, const Geometry& g, int64_t begin, int64_t end, const acc_t* shift,
                     ShiftedSums* totals);
  void (*rows_normalize)(const T* x, T* y, const Geometry& g, int64_t begin, int64_t end, const acc_t* mean,
                         const acc_t* scale, const acc_t* bias, acc_t param, Store store);
  void (*rows_grad_sums)(const T* dy, const T* x, T* dz, const Geometry& g, int64_t begin, int64_t end,
                         const acc_t* mean, const acc_t* scale, const acc_t* bias, acc_t param, double* sum_dy,
                         double* sum_dy_xmu);
  void (*rows_grad_input)(const T* dy, const T* x, T* dx, const Geometry& g, int64_t begin, int64_t end,
                          const GradInputCoefficients<acc_t>* k, acc_t param, Store store);

  // Rows [begin, end) of `b`. Per-lane arrays have b.width entries, in
  // lane_order<T>(b); per-channel outputs b.channels entries, added to.
  void (*blocks_stats)(const T* x, const Blocks& b, int64_t begin, int64_t end, const acc_t* shift,
                       ShiftedSums* totals);
  void (*blocks_normalize)(const T* x, T* y, const Blocks& b, int64_t begin, int64_t end,
                           const acc_t* mean, const acc_t* scale, const acc_t* bias, acc_t param, Store store);
  void (*blocks_grad_sums)(const T* dy, const T* x, T* dz, const Blocks& b, int64_t begin, int64_t end,
                           const acc_t* mean, const acc_t* scale, const acc_t* bias, acc_t param, double* sum_dy,
                           double* sum_dy_xmu);
  void (*blocks_grad_input)(const T* dy, const T* x, T* dx, const Blocks& b, int64_t begin, int64_t end,
                            const GradInputLanes<acc_t>& k, acc_t param, Store store);
};

// Whether the backward writes dz = dy * act'(z) into the input gradient's
// buffer during its reduction and then computes the input gradient from it
// (the identity's kernels, in place), rather than evaluating act' in both
// passes. An exp per value costs more than writing and reading dz back from
// cache or memory; a compare does not. dz is kept in the input's dtype:
// for bfloat16 and float16 rounded, as native's activation backward rounds
// its output and as torch_safebn.reference's backward does.
inline bool stores_activation_grad(Activation activation) {
  return activation == Activation::kSilu || activation == Activation::kGelu || activation == Activation::kGeluTanh;
}

// The table for `activation` and the best instruction set this processor supports.
template <typename T>
const KernelTable<T>& kernels(Activation activation);

// Name of the instruction set kernels() picked: "avx512", "avx2" or "baseline".
const char* kernel_isa();

}  // namespace cpu
}  // namespace safebn
