// Kernel bodies, included by kernels.cpp once per instruction set inside a
// namespace of that name. Written as plain loops over contiguous memory with
// independent lanes, which the compiler vectorizes for the target at hand.
// Deliberately no #pragma once and no includes: kernels.cpp provides them.

constexpr int64_t kLanes = 16;

// One Welford step for `width` lanes that have all seen the same number of
// values (`inv_count` = 1 / that number, including this step). Values are
// taken relative to a per-lane shift near the data: with a large common
// offset (1e4 + N(0, 1)) a float32 running mean cannot absorb increments
// below half its ulp, and the variance would drift by the mean's error squared.
template <typename T, typename acc_t>
inline void welford_lanes(const T* __restrict__ x, const acc_t* __restrict__ shift, acc_t* __restrict__ mean,
                          acc_t* __restrict__ m2, int64_t width, acc_t inv_count) {
  for (int64_t j = 0; j < width; ++j) {
    const acc_t v = load(x[j]) - shift[j];
    const acc_t delta = v - mean[j];
    mean[j] += delta * inv_count;
    m2[j] += delta * (v - mean[j]);
  }
}

template <typename acc_t>
inline void merge_lanes(Welford<acc_t>& total, const acc_t* mean, const acc_t* m2,
                        int64_t width, int64_t count) {
  for (int64_t j = 0; j < width; ++j) total.merge({mean[j], m2[j], acc_t(count)});
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
  Welford<acc_t> total;
  if (begin >= end) return total;
  acc_t shift[kLanes], mean[kLanes] = {}, m2[kLanes] = {};
  for_each_run(g, c, begin, begin + 1, [&](int64_t offset, int64_t) {
    for (int64_t j = 0; j < kLanes; ++j) shift[j] = load(x[offset]);
  });
  int64_t blocks = 0;
  Welford<acc_t> tail;
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    const T* p = x + offset;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      ++blocks;
      welford_lanes(p + i, shift, mean, m2, kLanes, acc_t(1) / acc_t(blocks));
    }
    for (; i < len; ++i) tail.add(load(p[i]) - shift[0]);
  });
  merge_lanes(total, mean, m2, kLanes, blocks);
  total.merge(tail);
  total.mean += shift[0];
  return total;
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
  const int64_t step = rows_per_block(channels), width = step * channels;
  std::vector<acc_t> first_row(channels);
  for (int64_t c = 0; c < channels; ++c) first_row[c] = load(x[begin * channels + c]);
  const std::vector<acc_t> shift = tile(first_row.data(), channels, width);
  std::vector<acc_t> mean(width), m2(width);
  int64_t blocks = 0, r = begin;
  for (; r + step <= end; r += step) {
    ++blocks;
    welford_lanes(x + r * channels, shift.data(), mean.data(), m2.data(), width, acc_t(1) / acc_t(blocks));
  }
  std::vector<Welford<acc_t>> shifted(channels);
  for (int64_t j = 0; j < width; ++j) shifted[j % channels].merge({mean[j], m2[j], acc_t(blocks)});
  for (; r < end; ++r)
    for (int64_t c = 0; c < channels; ++c) shifted[c].add(load(x[r * channels + c]) - first_row[c]);
  for (int64_t c = 0; c < channels; ++c) {
    shifted[c].mean += first_row[c];
    stats[c].merge(shifted[c]);
  }
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
