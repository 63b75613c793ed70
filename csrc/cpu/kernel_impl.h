// Kernel bodies, included by kernels.cpp once per instruction set inside a
// namespace of that name. Written as plain loops over contiguous memory with
// independent lanes, which the compiler vectorizes for the target at hand.
// Deliberately no #pragma once and no includes: kernels.cpp provides them.

constexpr int64_t kLanes = 16;
// Widest block a channels-last pass accumulates in registers/stack at once.
constexpr int64_t kMaxWidth = 512;

// Statistics are accumulated as sums of x - shift and (x - shift)^2, with the
// shift a value of the same channel: two independent FMAs per element, where
// a per-element Welford update is a dependent chain. The shift keeps the sums
// small for data with a large common offset (1e4 + N(0, 1)); the lanes hold
// at most kFlushEvery values each in acc_t before they are added to double
// totals, so float32 rounding stays far below the 1e-4 the variance needs.
constexpr int64_t kFlushEvery = 256;

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

// Adds `blocks` blocks of `width` contiguous values, `stride` apart, lane j
// relative to shift[j], to the lanes' sums and flushes them into
// totals[j % channels].
template <typename T, typename acc_t>
inline void shifted_sums(const T* __restrict__ x, const acc_t* __restrict__ shift, int64_t width,
                         int64_t stride, int64_t blocks, int64_t channels, ShiftedSums* totals) {
  acc_t s1[kMaxWidth], s2[kMaxWidth];
  for (int64_t b = 0; b < blocks; b += kFlushEvery) {
    for (int64_t j = 0; j < width; ++j) s1[j] = s2[j] = 0;
    const int64_t stop = std::min(blocks, b + kFlushEvery);
    for (int64_t k = b; k < stop; ++k) {
      const T* __restrict__ p = x + k * stride;
      for (int64_t j = 0; j < width; ++j) {
        const acc_t v = load(p[j]) - shift[j];
        s1[j] += v;
        s2[j] += v * v;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      ShiftedSums& t = totals[j % channels];
      t.sum += s1[j];
      t.sum_sq += s2[j];
      t.count += stop - b;
    }
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
Welford<acc_type<T>> plane_stats(const T* x, const Geometry& g, int64_t c,
                                 int64_t begin, int64_t end) {
  using acc_t = acc_type<T>;
  if (begin >= end) return {};
  acc_t shift[kLanes];
  for_each_run(g, c, begin, begin + 1, [&](int64_t offset, int64_t) {
    for (int64_t j = 0; j < kLanes; ++j) shift[j] = load(x[offset]);
  });
  ShiftedSums total;
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const int64_t blocks = len / kLanes;
    shifted_sums(x + offset, shift, kLanes, kLanes, blocks, 1, &total);
    for (int64_t i = blocks * kLanes; i < len; ++i) {
      const double v = double(load(x[offset + i])) - double(shift[0]);
      total.sum += v;
      total.sum_sq += v * v;
      total.count += 1;
    }
  });
  return total.welford(shift[0]);
}

template <typename T>
void plane_normalize(const T* x, T* y, const Geometry& g, int64_t c, int64_t begin,
                     int64_t end, acc_type<T> mean, acc_type<T> scale, acc_type<T> bias) {
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ in = x + offset;
    T* __restrict__ out = y + offset;
    for (int64_t i = 0; i < len; ++i) store(out + i, normalize_value(load(in[i]), mean, scale, bias));
  });
}

template <typename T>
void plane_grad_sums(const T* dy, const T* x, const Geometry& g, int64_t c, int64_t begin,
                     int64_t end, acc_type<T> mean, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ gp = dy + offset;
    const T* __restrict__ xp = x + offset;
    acc_t sdy[kLanes] = {}, sdyx[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t d = load(gp[i + j]);
        sdy[j] += d;
        sdyx[j] += d * (load(xp[i + j]) - mean);
      }
    }
    double run_dy = 0, run_dyx = 0;
    for (int64_t j = 0; j < kLanes; ++j) {
      run_dy += sdy[j];
      run_dyx += sdyx[j];
    }
    for (; i < len; ++i) {
      const acc_t d = load(gp[i]);
      run_dy += d;
      run_dyx += d * (load(xp[i]) - mean);
    }
    *sum_dy += run_dy;
    *sum_dy_xmu += run_dyx;
  });
}

template <typename T>
void plane_grad_input(const T* dy, const T* x, T* dx, const Geometry& g, int64_t c,
                      int64_t begin, int64_t end, const GradInputCoefficients<acc_type<T>>& k) {
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* __restrict__ gp = dy + offset;
    const T* __restrict__ xp = x + offset;
    T* __restrict__ out = dx + offset;
    for (int64_t i = 0; i < len; ++i) store(out + i, grad_input_value(load(gp[i]), load(xp[i]), k));
  });
}

// Channels-last rows are walked in blocks of `rows_per_block` rows so that a
// block holds at least kLanes values even when C is small (C = 3 for images):
// lane j of a block always belongs to channel j % C.
inline int64_t rows_per_block(int64_t channels) {
  return channels >= kLanes ? 1 : (kLanes + channels - 1) / channels;
}

// Repeats a per-channel array over one block's width.
template <typename acc_t>
inline std::vector<acc_t> tile(const acc_t* per_channel, int64_t channels, int64_t width) {
  std::vector<acc_t> out(width);
  for (int64_t j = 0; j < width; ++j) out[j] = per_channel[j % channels];
  return out;
}

template <typename T>
void rows_stats(const T* x, int64_t channels, int64_t begin, int64_t end,
                Welford<acc_type<T>>* stats) {
  using acc_t = acc_type<T>;
  if (begin >= end) return;
  std::vector<acc_t> first_row(channels);
  for (int64_t c = 0; c < channels; ++c) first_row[c] = load(x[begin * channels + c]);
  std::vector<ShiftedSums> totals(channels);
  // Blocks of whole rows, at least kLanes values wide (lane j is channel
  // j % C); rows wider than kMaxWidth are walked as strips of channels.
  const int64_t step = rows_per_block(channels);
  if (step * channels <= kMaxWidth) {
    const int64_t width = step * channels, blocks = (end - begin) / step;
    const std::vector<acc_t> shift = tile(first_row.data(), channels, width);
    shifted_sums(x + begin * channels, shift.data(), width, width, blocks, channels, totals.data());
    for (int64_t r = begin + blocks * step; r < end; ++r)
      for (int64_t c = 0; c < channels; ++c) {
        const double v = double(load(x[r * channels + c])) - double(first_row[c]);
        totals[c].sum += v;
        totals[c].sum_sq += v * v;
        totals[c].count += 1;
      }
  } else {
    for (int64_t c0 = 0; c0 < channels; c0 += kMaxWidth) {
      const int64_t width = std::min(kMaxWidth, channels - c0);
      shifted_sums(x + begin * channels + c0, first_row.data() + c0, width, channels, end - begin, width,
                   totals.data() + c0);
    }
  }
  for (int64_t c = 0; c < channels; ++c) stats[c].merge(totals[c].welford(first_row[c]));
}

template <typename T>
void rows_normalize(const T* x, T* y, int64_t channels, int64_t begin, int64_t end,
                    const acc_type<T>* mean, const acc_type<T>* scale, const acc_type<T>* bias) {
  using acc_t = acc_type<T>;
  const int64_t step = rows_per_block(channels), width = step * channels;
  const std::vector<acc_t> m = tile(mean, channels, width), s = tile(scale, channels, width),
                           b = tile(bias, channels, width);
  const acc_t* __restrict__ mp = m.data();
  const acc_t* __restrict__ sp = s.data();
  const acc_t* __restrict__ bp = b.data();
  for (int64_t r = begin; r < end; r += step) {
    const int64_t len = std::min(step, end - r) * channels;
    const T* __restrict__ in = x + r * channels;
    T* __restrict__ out = y + r * channels;
    for (int64_t j = 0; j < len; ++j) store(out + j, normalize_value(load(in[j]), mp[j], sp[j], bp[j]));
  }
}

template <typename T>
void rows_grad_sums(const T* dy, const T* x, int64_t channels, int64_t begin, int64_t end,
                    const acc_type<T>* mean, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  // Lanes accumulate in acc_t for speed and flush to double often enough that
  // float32 rounding stays far below the gradient tolerances.
  constexpr int64_t kBlocksPerFlush = 256;
  const int64_t step = rows_per_block(channels), width = step * channels;
  const std::vector<acc_t> m = tile(mean, channels, width);
  std::vector<acc_t> sdy(width), sdyx(width);
  const acc_t* __restrict__ mp = m.data();
  acc_t* __restrict__ a = sdy.data();
  acc_t* __restrict__ b = sdyx.data();
  auto flush = [&](int64_t lanes) {
    for (int64_t j = 0; j < lanes; ++j) {
      sum_dy[j % channels] += a[j];
      sum_dy_xmu[j % channels] += b[j];
      a[j] = b[j] = 0;
    }
  };
  int64_t r = begin, blocks = 0;
  for (; r < end; r += step) {
    const int64_t len = std::min(step, end - r) * channels;
    const T* __restrict__ gp = dy + r * channels;
    const T* __restrict__ xp = x + r * channels;
    for (int64_t j = 0; j < len; ++j) {
      const acc_t d = load(gp[j]);
      a[j] += d;
      b[j] += d * (load(xp[j]) - mp[j]);
    }
    if (++blocks % kBlocksPerFlush == 0) flush(width);
  }
  flush(width);
}

template <typename T>
void rows_grad_input(const T* dy, const T* x, T* dx, int64_t channels, int64_t begin,
                     int64_t end, const GradInputCoefficients<acc_type<T>>* k) {
  using acc_t = acc_type<T>;
  const int64_t step = rows_per_block(channels), width = step * channels;
  std::vector<acc_t> mean(width), scale(width), mean_dy(width), proj(width);
  for (int64_t j = 0; j < width; ++j) {
    const auto& kc = k[j % channels];
    mean[j] = kc.mean;
    scale[j] = kc.scale;
    mean_dy[j] = kc.mean_dy;
    proj[j] = kc.proj;
  }
  const acc_t* __restrict__ mp = mean.data();
  const acc_t* __restrict__ sp = scale.data();
  const acc_t* __restrict__ dp = mean_dy.data();
  const acc_t* __restrict__ pp = proj.data();
  for (int64_t r = begin; r < end; r += step) {
    const int64_t len = std::min(step, end - r) * channels;
    const T* __restrict__ gp = dy + r * channels;
    const T* __restrict__ xp = x + r * channels;
    T* __restrict__ out = dx + r * channels;
    for (int64_t j = 0; j < len; ++j) {
      const acc_t v = (load(gp[j]) - dp[j] - (load(xp[j]) - mp[j]) * pp[j]) * sp[j];
      store(out + j, v);
    }
  }
}

template <typename T>
KernelTable<T> make_table() {
  return {&plane_stats<T>,   &plane_normalize<T>, &plane_grad_sums<T>, &plane_grad_input<T>,
          &rows_stats<T>,    &rows_normalize<T>,  &rows_grad_sums<T>,  &rows_grad_input<T>};
}
