// Kernel bodies, included by kernels.cpp once per instruction set inside a
// namespace of that name. Written as plain loops over contiguous memory with
// independent lanes, which the compiler vectorizes for the target at hand.
// Deliberately no #pragma once and no includes: kernels.cpp provides them.

// Independent accumulators per sum over a contiguous run: enough to hide the
// add latency (4 AVX2 registers per sum); 16 runs at half the speed.
constexpr int64_t kLanes = 32;
// Widest strip of a block whose lane sums are kept on the stack.
constexpr int64_t kMaxStrip = 1024;

// Statistics are accumulated as sums of x - shift and (x - shift)^2, with the
// shift a value of the same channel: two independent FMAs per element, where
// a per-element Welford update is a dependent chain. The shift keeps the sums
// small for data with a large common offset (1e4 + N(0, 1)); each acc_t lane
// holds at most kFlushEvery values before it is added to double totals, so
// float32 rounding stays far below the 1e-4 the variance needs.
constexpr int64_t kFlushEvery = 256;

// ---------------------------------------------------------------------------
// Contiguous layouts with long rows: one channel's "plane" (plane index
// i = n * S + s) at a time, so that a channel can be reduced and then written
// while it is still in cache. [begin, end) may start and stop mid-row.

// Adds sum_i a_i and sum_i b_i over i in [0, n) to two double totals, where
// terms(i, a, b) adds a_i to a and b_i to b; kLanes acc_t accumulators per
// sum, tree-reduced and flushed every kFlushEvery blocks.
template <typename acc_t, typename Terms>
inline void sum_pairs(int64_t n, Terms terms, double& total_a, double& total_b) {
  int64_t i = 0;
  while (i < n) {
    const int64_t stop = std::min(n, i + kFlushEvery * kLanes);
    acc_t a[kLanes] = {}, b[kLanes] = {};
    for (; i + kLanes <= stop; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) terms(i + j, a[j], b[j]);
    for (int64_t j = 0; i + j < stop; ++j) terms(i + j, a[j], b[j]);
    i = stop;
    for (int64_t w = kLanes / 2; w > 0; w /= 2)
      for (int64_t j = 0; j < w; ++j) {
        a[j] += a[j + w];
        b[j] += b[j + w];
      }
    total_a += a[0];
    total_b += b[0];
  }
}

// Calls fn(offset, length) for each contiguous run of channel c's plane
// indices [begin, end); offset is the run's position in the tensor.
template <typename Fn>
inline void for_each_run(const Geometry& g, int64_t c, int64_t begin, int64_t end, Fn fn) {
  const int64_t S = g.spatial;
  int64_t i = begin;
  while (i < end) {
    const int64_t n = i / S, s = i % S;
    const int64_t len = std::min(S - s, end - i);
    fn((n * g.channels + c) * S + s, len);
    i += len;
  }
}

template <typename T>
Welford<acc_type<T>> plane_stats(const T* x, const Geometry& g, int64_t c, int64_t begin, int64_t end) {
  using acc_t = acc_type<T>;
  if (begin >= end) return {};
  acc_t shift = 0;
  for_each_run(g, c, begin, begin + 1, [&](int64_t offset, int64_t) { shift = load(x[offset]); });
  ShiftedSums total;
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ p = x + offset;
    sum_pairs<acc_t>(len, [&](int64_t i, acc_t& s1, acc_t& s2) {
      const acc_t v = load(p[i]) - shift;
      s1 += v;
      s2 += v * v;
    }, total.sum, total.sum_sq);
    total.count += len;
  });
  return total.welford(shift);
}

template <typename T>
void plane_normalize(const T* x, T* y, const Geometry& g, int64_t c, int64_t begin, int64_t end,
                     acc_type<T> mean, acc_type<T> scale, acc_type<T> bias) {
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ in = x + offset;
    T* __restrict__ out = y + offset;
    for (int64_t i = 0; i < len; ++i) store(out + i, normalize_value(load(in[i]), mean, scale, bias));
  });
}

template <typename T>
void plane_grad_sums(const T* dy, const T* x, const Geometry& g, int64_t c, int64_t begin, int64_t end,
                     acc_type<T> mean, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ gp = dy + offset;
    const T* __restrict__ xp = x + offset;
    sum_pairs<acc_t>(len, [&](int64_t i, acc_t& a, acc_t& b) {
      const acc_t d = load(gp[i]);
      a += d;
      b += d * (load(xp[i]) - mean);
    }, *sum_dy, *sum_dy_xmu);
  });
}

template <typename T>
void plane_grad_input(const T* dy, const T* x, T* dx, const Geometry& g, int64_t c, int64_t begin,
                      int64_t end, const GradInputCoefficients<acc_type<T>>& k) {
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ gp = dy + offset;
    const T* __restrict__ xp = x + offset;
    T* __restrict__ out = dx + offset;
    for (int64_t i = 0; i < len; ++i) store(out + i, grad_input_value(load(gp[i]), load(xp[i]), k));
  });
}

// ---------------------------------------------------------------------------
// Everything else walks the tensor in memory order, as rows of `width` values
// (Blocks): lane j of every row belongs to the same channel, and per-lane
// constants (`lanes`, tiled by the caller) line up with the data.

// Adds the sums of rows [begin, end) into per-channel totals: terms(offset,
// j, a, b) adds lane j's terms of the value at `offset`. Lanes are summed in
// strips of kMaxStrip, kFlushEvery rows at a time, then flushed.
template <typename acc_t, typename Terms>
inline void sum_blocks(const Blocks& b, int64_t begin, int64_t end, Terms terms, double* total_a,
                       double* total_b) {
  acc_t a[kMaxStrip], s[kMaxStrip];
  for (int64_t j0 = 0; j0 < b.width; j0 += kMaxStrip) {
    const int64_t w = std::min(kMaxStrip, b.width - j0);
    for (int64_t r0 = begin; r0 < end; r0 += kFlushEvery) {
      for (int64_t j = 0; j < w; ++j) a[j] = s[j] = 0;
      const int64_t r1 = std::min(end, r0 + kFlushEvery);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = b.offset + r * b.stride + j0;
        for (int64_t j = 0; j < w; ++j) terms(row + j, j0 + j, a[j], s[j]);
      }
      for (int64_t j = 0; j < w; ++j) {
        total_a[b.channel_of(j0 + j)] += a[j];
        total_b[b.channel_of(j0 + j)] += s[j];
      }
    }
  }
}

template <typename T>
void blocks_stats(const T* x, const Blocks& b, int64_t begin, int64_t end, const acc_type<T>* shift,
                  ShiftedSums* totals) {
  using acc_t = acc_type<T>;
  std::vector<double> sum(b.channels, 0.0), sum_sq(b.channels, 0.0);
  sum_blocks<acc_t>(b, begin, end, [&](int64_t i, int64_t j, acc_t& s1, acc_t& s2) {
    const acc_t v = load(x[i]) - shift[j];
    s1 += v;
    s2 += v * v;
  }, sum.data(), sum_sq.data());
  const int64_t count = (end - begin) * (b.width / b.channels);
  for (int64_t c = 0; c < b.channels; ++c) {
    totals[c].sum += sum[c];
    totals[c].sum_sq += sum_sq[c];
    totals[c].count += count;
  }
}

template <typename T>
void blocks_grad_sums(const T* dy, const T* x, const Blocks& b, int64_t begin, int64_t end,
                      const acc_type<T>* mean, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  sum_blocks<acc_t>(b, begin, end, [&](int64_t i, int64_t j, acc_t& a, acc_t& s) {
    const acc_t d = load(dy[i]);
    a += d;
    s += d * (load(x[i]) - mean[j]);
  }, sum_dy, sum_dy_xmu);
}

template <typename T>
void blocks_normalize(const T* x, T* y, const Blocks& b, int64_t begin, int64_t end,
                      const acc_type<T>* mean, const acc_type<T>* scale, const acc_type<T>* bias) {
  for (int64_t r = begin; r < end; ++r) {
    const T* __restrict__ in = x + b.offset + r * b.stride;
    T* __restrict__ out = y + b.offset + r * b.stride;
    for (int64_t j = 0; j < b.width; ++j) store(out + j, normalize_value(load(in[j]), mean[j], scale[j], bias[j]));
  }
}

template <typename T>
void blocks_grad_input(const T* dy, const T* x, T* dx, const Blocks& b, int64_t begin, int64_t end,
                       const GradInputLanes<acc_type<T>>& k) {
  using acc_t = acc_type<T>;
  const acc_t* __restrict__ mean = k.mean;
  const acc_t* __restrict__ scale = k.scale;
  const acc_t* __restrict__ mean_dy = k.mean_dy;
  const acc_t* __restrict__ proj = k.proj;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = b.offset + r * b.stride;
    const T* __restrict__ gp = dy + row;
    const T* __restrict__ xp = x + row;
    T* __restrict__ out = dx + row;
    for (int64_t j = 0; j < b.width; ++j) {
      const GradInputCoefficients<acc_t> kj{mean[j], scale[j], mean_dy[j], proj[j]};
      store(out + j, grad_input_value(load(gp[j]), load(xp[j]), kj));
    }
  }
}

template <typename T>
KernelTable<T> make_table() {
  return {&plane_stats<T>,  &plane_normalize<T>,  &plane_grad_sums<T>,  &plane_grad_input<T>,
          &blocks_stats<T>, &blocks_normalize<T>, &blocks_grad_sums<T>, &blocks_grad_input<T>};
}
