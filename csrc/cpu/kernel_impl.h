// Kernel bodies, included by kernels.cpp once per instruction set inside a
// namespace of that name. Written as plain loops over contiguous memory with
// independent lanes, which the compiler vectorizes for the target at hand.
// Deliberately no #pragma once and no includes: kernels.cpp provides them.

// Independent accumulators per sum over a long contiguous run: enough to
// hide the add latency (4 AVX2 registers per sum); 16 runs at half the speed.
constexpr int64_t kLanes = 32;
// Fewer for the short rows of a row-by-row walk, whose lanes are reduced at
// the end of every row: with 32, a float32 row of 64 values took twice as
// long as with 16.
constexpr int64_t kRowLanes = 16;
// Widest strip of a block whose lane sums are kept on the stack.
constexpr int64_t kMaxStrip = 1024;
// Bytes of lane sums per sum that a block's statistics keep in registers
// while they walk kFlushRows rows (32 float32 lanes: two AVX-512 or four
// AVX2 registers): with the sums on the stack, each row's adds waited on the
// stores of the row before.
constexpr int64_t kRegisterSumBytes = 128;
// Bytes of lane sums per sum of a folded row (sum_blocks): four vector
// registers (kVectorBytes, set per instruction set by kernels.cpp), so that
// channels-last C = 64 folds on AVX-512. Not the pieces' size too: in pieces
// of 64 lanes, rows of 4 * 64 + 32 values (channels-last C = 96) left their
// last 32 lanes to sums on the stack, and their statistics took 15 to 27%
// longer.
constexpr int64_t kFoldedSumBytes = 4 * kVectorBytes;
// The most bytes of kFlushRows rows that the statistics walk in register
// pieces (sum_blocks).
constexpr int64_t kPieceRowsBytes = int64_t(64) << 10;

// Statistics are accumulated as sums of x - shift and (x - shift)^2, with the
// shift a value of the same channel: two independent FMAs per element, where
// a per-element Welford update is a dependent chain. The shift keeps the sums
// small for data with a large common offset (1e4 + N(0, 1)); each acc_t lane
// holds at most kFlushEvery values before it is added to double totals, so
// float32 rounding stays far below the 1e-4 the variance needs. The lanes
// of a block's strip take a row at a time and are flushed every
// kFlushRows rows: a narrow block (channels-last C = 3 takes a row of 3
// lanes) otherwise sums hundreds of values per lane in float32, and its
// statistics came out 10 times less accurate than native's; the flush
// costs a double add per lane every kFlushRows rows.
constexpr int64_t kFlushEvery = 256;
constexpr int64_t kFlushRows = 32;

// Values at a time whose dz is written and read back while in L2
// (run_grad_sums, blocks_grad_sums): float dy, x and dz take 768 KB.
constexpr int64_t kCachedValues = 65536;

// One or two inputs read in step. The kernels' lambdas take a word's values
// unpacked, input m's value k at values[m][k] (a lambda compiled for this
// ISA cannot be inlined into a library template such as std::apply, so the
// values travel as arrays).
template <typename T, size_t N>
using Inputs = std::array<const T*, N>;

template <typename P, typename T, size_t N>
inline std::array<std::array<acc_type<T>, P::kValues>, N> unpack_words(const Inputs<T, N>& in, int64_t i) {
  std::array<std::array<acc_type<T>, P::kValues>, N> values;
  for (size_t m = 0; m < N; ++m) values[m] = P::unpack(load_word<P>(in[m], i));
  return values;
}

template <typename T, size_t N>
inline Inputs<T, N> advanced(const Inputs<T, N>& in, int64_t offset) {
  Inputs<T, N> moved;
  for (size_t m = 0; m < N; ++m) moved[m] = in[m] + offset;
  return moved;
}

// The terms of the statistics' sums: x - shift and its square.
template <typename acc_t>
inline void add_shifted_terms(acc_t x, acc_t shift, acc_t& sum, acc_t& sum_sq) {
  const acc_t d = x - shift;
  sum += d;
  sum_sq += d * d;
}

// The terms of the gradient's sums: dy and dy * (x - mean).
template <typename acc_t>
inline void add_grad_terms(acc_t dy, acc_t x, acc_t mean, acc_t& sum_dy, acc_t& sum_dy_xmu) {
  sum_dy += dy;
  sum_dy_xmu += dy * (x - mean);
}

// ---------------------------------------------------------------------------
// Contiguous runs of values, the building blocks of the plane and row walks.

// Adds a run's sums over its n values to two double totals: add(values, k,
// a, b) adds to a and b the terms of value k of a word. Lanes acc_t
// accumulators per sum take words in turn; they are tree-reduced and flushed
// once each holds kFlushEvery values. Values short of a whole word are added
// one by one.
template <int64_t Lanes, typename T, size_t N, typename Add>
inline void sum_values(int64_t n, const Inputs<T, N>& in, Add add, double& total_a, double& total_b) {
  using acc_t = acc_type<T>;
  using P = Packing<T>;
  constexpr int V = P::kValues;
  const int64_t words = n / V;
  int64_t i = 0;
  while (i < words) {
    const int64_t stop = std::min(words, i + kFlushEvery * Lanes / V);
    acc_t a[Lanes] = {}, b[Lanes] = {};
    const auto add_word = [&](int64_t word, int64_t j) {
      const auto values = unpack_words<P>(in, word);
      for (int k = 0; k < V; ++k) add(values, k, a[j], b[j]);
    };
    for (; i + Lanes <= stop; i += Lanes) {
      if constexpr (Lanes > kRowLanes) {
        for (int64_t j = 0; j < Lanes; ++j) add_word(i + j, j);
      } else {
        // Kept a loop: GCC 12 unrolls a loop this short over floats and then
        // vectorizes the loop around it instead, with a shuffle per value.
#pragma GCC unroll 1
        for (int64_t j = 0; j < Lanes; ++j) add_word(i + j, j);
      }
    }
    for (int64_t j = 0; i + j < stop; ++j) add_word(i + j, j);
    i = stop;
    for (int64_t w = Lanes / 2; w > 0; w /= 2)
      for (int64_t j = 0; j < w; ++j) {
        a[j] += a[j + w];
        b[j] += b[j + w];
      }
    total_a += a[0];
    total_b += b[0];
  }
  for (int64_t r = words * V; r < n; ++r) {
    acc_t a = 0, b = 0;
    add(unpack_words<ValueByValue<T>>(in, r), 0, a, b);
    total_a += a;
    total_b += b;
  }
}

// out[r] = f(values, k) for the n values of a run, a word at a time.
template <typename T, size_t N, typename F>
inline void map_values(int64_t n, const Inputs<T, N>& in, T* out, F f) {
  using P = Packing<T>;
  constexpr int V = P::kValues;
  const int64_t words = n / V;
  for (int64_t i = 0; i < words; ++i) {
    const auto values = unpack_words<P>(in, i);
    std::array<acc_type<T>, V> result;
    for (int k = 0; k < V; ++k) result[k] = f(values, k);
    store_word<P>(out, i, P::pack(result));
  }
  for (int64_t r = words * V; r < n; ++r) store(out + r, f(unpack_words<ValueByValue<T>>(in, r), 0));
}

// ---------------------------------------------------------------------------
// Outputs written as Store says (kernels.h). Streamed, values are computed
// into a tile that stays in L1 and copied out with the NonTemporal stores of
// the instruction set (kernels.cpp): GCC's vectorizer never emits
// non-temporal stores itself. A 2 KB tile: in a standalone loop over 67 MB
// of float32, an 8 KB tile ran no faster than plain stores, a 2 KB one 17%
// faster.
template <typename T>
constexpr int64_t kTileValues = 2048 / int64_t(sizeof(T));
constexpr int64_t kCacheLine = 64;

// Copies n values from src to dst: from the first cache line boundary on,
// whole vectors with non-temporal stores; the parts before it and after the
// last whole vector with plain ones.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  constexpr int64_t W = NonTemporal::kBytes;
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * int64_t(sizeof(T));
  const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(d) % kCacheLine);
  const int64_t head = std::min<int64_t>(bytes, (kCacheLine - misaligned) % kCacheLine);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + W <= bytes; i += W) NonTemporal::store(d + i, s + i);
  std::memcpy(d + i, s + i, bytes - i);
}

// Writes rows [begin, end) of `row_values` values, `stride` apart from
// `out` (row `begin`): write(r, lo, hi, dst) writes values [lo, hi) of row r
// to dst, lo a multiple of `word` values and hi too or the row's end. Cached,
// each row in one call to its place. Streamed, through a tile: as many whole
// rows at a time as it holds when the rows lie one after another, or a row in
// pieces, the first shortened so that the others start on a cache line
// where a word boundary falls on one. The caller fences (fence_if_streamed)
// once its stores are done. Always inlined: called out of line, the eval of
// channels-last bfloat16 [32, 64, 56, 56] took 15 to 20% longer.
template <typename T, typename Write>
__attribute__((always_inline)) inline void write_rows(T* out, int64_t begin, int64_t end, int64_t row_values,
                                                      int64_t stride, int64_t word, Store store, Write write) {
  if (store == Store::kCached || NonTemporal::kBytes == 0 || row_values == 0) {
    for (int64_t r = begin; r < end; ++r) write(r, 0, row_values, out + (r - begin) * stride);
    return;
  }
  if constexpr (NonTemporal::kBytes > 0) {
    constexpr int64_t kTile = kTileValues<T>;
    alignas(kCacheLine) T tile[kTile];
    if (stride == row_values && row_values <= kTile) {
      const int64_t rows_per_tile = kTile / row_values;
      for (int64_t r0 = begin; r0 < end; r0 += rows_per_tile) {
        const int64_t r1 = std::min(end, r0 + rows_per_tile);
        for (int64_t r = r0; r < r1; ++r) write(r, 0, row_values, tile + (r - r0) * row_values);
        stream_copy(out + (r0 - begin) * stride, tile, (r1 - r0) * row_values);
      }
      return;
    }
    const int64_t piece = kTile / word * word;
    for (int64_t r = begin; r < end; ++r) {
      T* row = out + (r - begin) * stride;
      const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(row) % kCacheLine) / int64_t(sizeof(T));
      int64_t hi = std::max(word, (piece - misaligned) / word * word);
      for (int64_t lo = 0; lo < row_values; lo = hi, hi += piece) {
        hi = std::min(hi, row_values);
        write(r, lo, hi, tile);
        stream_copy(row + lo, tile, hi - lo);
      }
    }
  }
}

// Orders a kernel's non-temporal stores before whatever reads its output
// next: another thread, once the parallel region ends, or the caller.
inline void fence_if_streamed(Store store) {
  if (store == Store::kStreamed) NonTemporal::fence();
}

// map_values over a run written as `store` says; the caller fences.
template <typename T, size_t N, typename F>
inline void map_values(int64_t n, const Inputs<T, N>& in, T* out, Store store, F f) {
  write_rows(out, 0, 1, n, n, Packing<T>::kValues, store, [&](int64_t, int64_t lo, int64_t hi, T* dst) {
    map_values(hi - lo, advanced(in, lo), dst, f);
  });
}

// The gradient's sums over a run of n values, of dz = dy * act'(z) with z
// recomputed from x. With `dz`, dz is written there first, kCachedValues at
// a time, and the sums read it back while it is in cache, so that the input
// gradient can read dz instead of evaluating act' a second time.
template <int64_t Lanes, typename Act, typename T>
inline void run_grad_sums(int64_t n, const T* dy, const T* x, T* dz, acc_type<T> mean, acc_type<T> scale,
                          acc_type<T> shift, acc_type<T> param, double& sum_dy, double& sum_dy_xmu) {
  using acc_t = acc_type<T>;
  if (dz == nullptr) {
    sum_values<Lanes>(n, Inputs<T, 2>{dy, x}, [=](const auto& v, int k, acc_t& a, acc_t& b) {
      add_grad_terms(grad_before_activation<Act>(v[0][k], v[1][k], mean, scale, shift, param), v[1][k], mean, a, b);
    }, sum_dy, sum_dy_xmu);
    return;
  }
  for (int64_t i = 0; i < n; i += kCachedValues) {
    const int64_t len = std::min(kCachedValues, n - i);
    map_values(len, Inputs<T, 2>{dy + i, x + i}, dz + i, [=](const auto& v, int k) {
      return grad_before_activation<Act>(v[0][k], v[1][k], mean, scale, shift, param);
    });
    sum_values<Lanes>(len, Inputs<T, 2>{dz + i, x + i}, [=](const auto& v, int k, acc_t& a, acc_t& b) {
      add_grad_terms(v[0][k], v[1][k], mean, a, b);
    }, sum_dy, sum_dy_xmu);
  }
}

// ---------------------------------------------------------------------------
// Contiguous layouts with long rows: one channel's "plane" (plane index
// i = n * S + s) at a time, so that a channel can be reduced and then written
// while it is still in cache. [begin, end) may start and stop mid-row.

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
    sum_values<kLanes>(len, Inputs<T, 1>{x + offset}, [shift](const auto& v, int k, acc_t& s1, acc_t& s2) {
      add_shifted_terms(v[0][k], shift, s1, s2);
    }, total.sum, total.sum_sq);
    total.count += len;
  });
  return total.welford(shift);
}

template <typename T, typename Act>
void plane_normalize(const T* x, T* y, const Geometry& g, int64_t c, int64_t begin, int64_t end,
                     acc_type<T> mean, acc_type<T> scale, acc_type<T> bias, acc_type<T> param, Store store) {
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    map_values(len, Inputs<T, 1>{x + offset}, y + offset, store,
               [=](const auto& v, int k) { return normalize_activate<Act>(v[0][k], mean, scale, bias, param); });
  });
  fence_if_streamed(store);
}

template <typename T, typename Act>
void plane_grad_sums(const T* dy, const T* x, T* dz, const Geometry& g, int64_t c, int64_t begin, int64_t end,
                     acc_type<T> mean, acc_type<T> scale, acc_type<T> bias, acc_type<T> param, double* sum_dy,
                     double* sum_dy_xmu) {
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    run_grad_sums<kLanes, Act>(len, dy + offset, x + offset, dz ? dz + offset : nullptr, mean, scale, bias, param,
                               *sum_dy, *sum_dy_xmu);
  });
}

template <typename T, typename Act>
void plane_grad_input(const T* dy, const T* x, T* dx, const Geometry& g, int64_t c, int64_t begin,
                      int64_t end, const GradInputCoefficients<acc_type<T>>& k, acc_type<T> param, Store store) {
  using acc_t = acc_type<T>;
  for_each_run(g, c, begin, end, [&](int64_t offset, int64_t len) {
    map_values(len, Inputs<T, 2>{dy + offset, x + offset}, dx + offset, store, [&k, param](const auto& v, int i) {
      const acc_t dz = grad_before_activation<Act>(v[0][i], v[1][i], k.mean, k.scale, k.shift, param);
      return grad_input_value(dz, v[1][i], k);
    });
  });
  fence_if_streamed(store);
}

// ---------------------------------------------------------------------------
// Contiguous layouts, the (n, c) rows [begin, end) in memory order: a stream
// through memory, where a channel's rows lie C * S apart. Each row's sums go
// to its channel's totals; each row is written with its channel's constants.

// Calls fn(c, offset) for each (n, c) row r in [begin, end): c = r % C, and
// offset = r * S, the row's position in the tensor.
template <typename Fn>
inline void for_each_row(const Geometry& g, int64_t begin, int64_t end, Fn fn) {
  for (int64_t r = begin; r < end; ++r) fn(r % g.channels, r * g.spatial);
}

template <typename T>
void rows_stats(const T* x, const Geometry& g, int64_t begin, int64_t end, const acc_type<T>* shift,
                ShiftedSums* totals) {
  using acc_t = acc_type<T>;
  for_each_row(g, begin, end, [&](int64_t c, int64_t offset) {
    const acc_t row_shift = shift[c];
    sum_values<kRowLanes>(g.spatial, Inputs<T, 1>{x + offset}, [row_shift](const auto& v, int k, acc_t& s1, acc_t& s2) {
      add_shifted_terms(v[0][k], row_shift, s1, s2);
    }, totals[c].sum, totals[c].sum_sq);
    totals[c].count += g.spatial;
  });
}

// Writes rows [begin, end) as `store` says: write(c, offset, lo, hi, dst)
// writes values [lo, hi) of the row of channel c at `offset` to dst.
template <typename T, typename Write>
inline void write_each_row(T* out, const Geometry& g, int64_t begin, int64_t end, Store store, Write write) {
  const int64_t S = g.spatial;
  write_rows(out + begin * S, begin, end, S, S, Packing<T>::kValues, store,
             [&](int64_t r, int64_t lo, int64_t hi, T* dst) { write(r % g.channels, r * S, lo, hi, dst); });
  fence_if_streamed(store);
}

template <typename T, typename Act>
void rows_normalize(const T* x, T* y, const Geometry& g, int64_t begin, int64_t end, const acc_type<T>* mean,
                    const acc_type<T>* scale, const acc_type<T>* bias, acc_type<T> param, Store store) {
  write_each_row(y, g, begin, end, store, [&](int64_t c, int64_t offset, int64_t lo, int64_t hi, T* dst) {
    const acc_type<T> m = mean[c], s = scale[c], b = bias[c];
    map_values(hi - lo, Inputs<T, 1>{x + offset + lo}, dst,
               [=](const auto& v, int k) { return normalize_activate<Act>(v[0][k], m, s, b, param); });
  });
}

template <typename T, typename Act>
void rows_grad_sums(const T* dy, const T* x, T* dz, const Geometry& g, int64_t begin, int64_t end,
                    const acc_type<T>* mean, const acc_type<T>* scale, const acc_type<T>* bias, acc_type<T> param,
                    double* sum_dy, double* sum_dy_xmu) {
  for_each_row(g, begin, end, [&](int64_t c, int64_t offset) {
    run_grad_sums<kRowLanes, Act>(g.spatial, dy + offset, x + offset, dz ? dz + offset : nullptr, mean[c],
                                  scale[c], bias[c], param, sum_dy[c], sum_dy_xmu[c]);
  });
}

template <typename T, typename Act>
void rows_grad_input(const T* dy, const T* x, T* dx, const Geometry& g, int64_t begin, int64_t end,
                     const GradInputCoefficients<acc_type<T>>* k, acc_type<T> param, Store store) {
  using acc_t = acc_type<T>;
  write_each_row(dx, g, begin, end, store, [&](int64_t c, int64_t offset, int64_t lo, int64_t hi, T* dst) {
    const GradInputCoefficients<acc_t> row_k = k[c];
    map_values(hi - lo, Inputs<T, 2>{dy + offset + lo, x + offset + lo}, dst, [&row_k, param](const auto& v, int i) {
      const acc_t dz = grad_before_activation<Act>(v[0][i], v[1][i], row_k.mean, row_k.scale, row_k.shift, param);
      return grad_input_value(dz, v[1][i], row_k);
    });
  });
}

// ---------------------------------------------------------------------------
// Everything else walks the tensor in memory order, as rows of `width` values
// (Blocks): lane j of every row belongs to the same channel, and per-lane
// constants, tiled by the caller in lane_order<T>(b), line up with the data.

// A packing policy passed as a value, so that a generic lambda can take it
// (lambdas with template parameters are C++20; torch < 2.12 builds as C++17).
template <typename P>
struct PackingTag {
  using type = P;
};

// Calls fn(PackingTag<P>{}) with the packing policy P that reads rows of `b`
// in lane_order<T>(b).
template <typename T, typename Fn>
inline void with_lane_packing(const Blocks& b, Fn fn) {
  if constexpr (Packing<T>::kValues == 1) {
    fn(PackingTag<ValueByValue<T>>{});
  } else {
    if (lane_order<T>(b).values == Packing<T>::kValues) fn(PackingTag<Packing<T>>{});
    else fn(PackingTag<ValueByValue<T>>{});
  }
}

// The sums a piece of a strip keeps (sum_blocks): as many as its words when
// their count is a constant (std::integral_constant), else a whole strip's.
template <typename Words>
constexpr int64_t piece_capacity(int64_t strip) {
  if constexpr (std::is_integral_v<Words>) return strip;
  else return Words::value;
}

// GCC's unroll-and-jam (-O3) paired every row of sum_blocks' walk with the
// next, its per-lane sums staying in place from row to row: the gradient's
// sums of channels_last [32, 64, 56, 56] float32, whose 51 MB outgrow the
// cache, took 3.5 to 4.7 ms on one thread against native's 1.6 to 2.8, and
// 2.0 to 2.2 one row at a time. The walk pairs rows itself where that pays
// (rows_in_pairs), and the compiler's pairing is off for sum_blocks alone:
// off everywhere, the contiguous inputs' plane and row walks took up to 1.7
// times as long. benchmarks/README.md, "Rows one at a time past the cache".
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-loop-unroll-and-jam")
#endif
// Adds the sums of rows [begin, end) into per-channel totals: add(values, k,
// lane, a, b) adds the terms of value k of a word, whose per-lane constants
// are at `lane`. Lanes are summed in strips of up to kMaxStrip values: in
// acc_t over kFlushRows rows at a time, then in double over the rest.
template <typename T, size_t N, typename Add>
inline void sum_blocks(const Blocks& b, int64_t begin, int64_t end, const Inputs<T, N>& in, Add add,
                       double* total_a, double* total_b) {
  with_lane_packing<T>(b, [&](auto tag) {
    using P = typename decltype(tag)::type;
    constexpr int V = P::kValues;
    const LaneOrder order = lane_order<T>(b);
    using acc_t = acc_type<T>;
    // Words of a row whose sums fit in registers: kWords at a time, and a
    // narrower piece at the end of a strip.
    constexpr int64_t kWords = std::max<int64_t>(1, kRegisterSumBytes / int64_t(sizeof(acc_t)) / V);
    // The statistics of rows no wider than a strip, kFlushRows of which take
    // at most kPieceRowsBytes (channels-last rows, [8192, 512]), are summed a
    // piece of kWords words at a time down those rows. Wider rows, and the
    // gradient's two inputs, are walked row by row along each strip, in
    // memory order: in pieces, each row read as a stream of its own, the
    // statistics of contiguous [64, 512, 7, 7] (rows of 25088 values) took
    // 20% longer on one thread, those of [8192, 1024] float32 (128 KB of
    // rows) 5 to 25% longer, and the gradient's sums of [8192, 512] 30%.
    const bool in_pieces =
        N == 1 && order.words <= kMaxStrip / V && kFlushRows * b.width * int64_t(sizeof(T)) <= kPieceRowsBytes;
    // Rows whose channels repeat every kFoldedWords words (channels-last
    // C = 64, 32, 16, ... in float32 or bfloat16 on AVX-512) are summed a
    // whole row at a time into one register piece, each of its pieces added
    // onto the first's lanes, whose channels they repeat: for statistics and
    // gradient alike, and within one strip, so never two rows at a time.
    // Read in memory order, the statistics of channels-last [64, 64, 112, 112]
    // float32 took 7.2 to 7.5 ms on one thread, against 18.2 to 18.3 with
    // each piece walked down 32 rows: on this VM reads in any other order
    // than ascending ran at half the speed past the cache
    // (benchmarks/README.md, "Channels-last rows folded"). Each lane then
    // holds `folds` values per row, kFlushRows rows at a time.
    constexpr int64_t kFoldedWords = std::max<int64_t>(1, kFoldedSumBytes / int64_t(sizeof(acc_t)) / V);
    const int64_t folds = order.words / kFoldedWords;
    const bool folded = order.words % kFoldedWords == 0 && order.words <= kMaxStrip / V &&
                        (kFoldedWords * V) % (b.per_channel * b.channels) == 0 && folds * kFlushRows <= kFlushEvery;
    // Rows wider than a strip are read a strip of each at a time, short
    // streams the prefetchers barely start on: two rows at a time keep more
    // loads in flight. Rows within a strip follow one another as one stream,
    // which reading two rows at a time splits in two.
    const bool rows_in_pairs = order.words > kMaxStrip / V;
    // The sums of a strip of words [i0, i0 + strip_words) in double: value k
    // of word i0 + i at k * strip_words + i.
    double lane_a[kMaxStrip], lane_b[kMaxStrip];
    for (int64_t i0 = 0; i0 < order.words; i0 += kMaxStrip / V) {
      const int64_t strip_words = std::min(kMaxStrip / V, order.words - i0);
      std::fill_n(lane_a, strip_words * V, 0.0);
      std::fill_n(lane_b, strip_words * V, 0.0);
      for (int64_t r0 = begin; r0 < end; r0 += kFlushRows) {
        const int64_t r1 = std::min(end, r0 + kFlushRows);
        // Words [w0, w0 + words) over rows [r0, r1), and the `fold` - 1
        // pieces of as many words after them in each row, summed in acc_t
        // (registers, when `words` is a constant), then flushed. `fold` is
        // the constant 1 unless the rows are folded: a count known only at
        // run time made the other walks 5 to 19% slower.
        auto sum_piece = [&](int64_t w0, auto words, auto fold) {
          using Words = decltype(words);
          constexpr int64_t kCapacity = piece_capacity<Words>(kMaxStrip / V);
          acc_t a[V][kCapacity], s[V][kCapacity];
          for (int k = 0; k < V; ++k) {
            std::fill_n(a[k], int64_t(words), acc_t(0));
            std::fill_n(s[k], int64_t(words), acc_t(0));
          }
          // The words of `rows` (one or two rows' Inputs) added in one pass
          // per value of a word: one contiguous stream of sums each, which
          // the compiler vectorizes once k is a constant.
          auto sweep = [&](const auto&... rows) {
#pragma GCC unroll 2
            for (int k = 0; k < V; ++k) {
              acc_t* __restrict__ a_k = a[k];
              acc_t* __restrict__ s_k = s[k];
              const int64_t lane = k * order.words + i0 + w0;
              for (int64_t i = 0; i < int64_t(words); ++i)
                (add(unpack_words<P>(rows, i), k, lane + i, a_k[i], s_k[i]), ...);
            }
          };
          auto row = [&](int64_t r) { return advanced(in, b.offset + r * b.stride + (i0 + w0) * V); };
          int64_t r = r0;
          if (rows_in_pairs)
            for (; r + 1 < r1; r += 2) sweep(row(r), row(r + 1));
          for (; r < r1; ++r)
            for (int64_t f = 0; f < int64_t(fold); ++f) sweep(advanced(row(r), f * int64_t(words) * V));
          for (int k = 0; k < V; ++k) {
            for (int64_t i = 0; i < int64_t(words); ++i) {
              lane_a[k * strip_words + w0 + i] += a[k][i];
              lane_b[k * strip_words + w0 + i] += s[k][i];
            }
          }
        };
        const std::integral_constant<int64_t, 1> kOnce{};
        if (folded) {
          sum_piece(0, std::integral_constant<int64_t, kFoldedWords>{}, folds);
          continue;
        }
        if (!in_pieces) {
          sum_piece(0, strip_words, kOnce);
          continue;
        }
        int64_t w0 = 0;
        for (; w0 + kWords <= strip_words; w0 += kWords)
          sum_piece(w0, std::integral_constant<int64_t, kWords>{}, kOnce);
        if (w0 < strip_words) sum_piece(w0, strip_words - w0, kOnce);
      }
      // A channel's lanes summed in registers, then added once per strip,
      // after all the rows: adding each lane to its channel's total chains
      // the S lanes of a contiguous input through memory, and the lanes of a
      // channels-last row, a channel each, cost as much as their sums when
      // added every kFlushRows rows.
      b.for_each_channel_span(i0 * V, (i0 + strip_words) * V, [&](int64_t first, int64_t last, int64_t c) {
        double span_a = 0, span_b = 0;
        for (int64_t j = first; j < last; ++j) {
          const int64_t strip_lane = (j % V) * strip_words + j / V - i0;
          span_a += lane_a[strip_lane];
          span_b += lane_b[strip_lane];
        }
        total_a[c] += span_a;
        total_b[c] += span_b;
      });
    }
  });
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// out = f(values, k, lane) over rows [begin, end), a word at a time, written as `store` says.
template <typename T, size_t N, typename F>
inline void map_blocks(const Blocks& b, int64_t begin, int64_t end, const Inputs<T, N>& in, T* out, Store store,
                       F f) {
  using acc_t = acc_type<T>;
  with_lane_packing<T>(b, [&](auto tag) {
    using P = typename decltype(tag)::type;
    constexpr int V = P::kValues;
    const LaneOrder order = lane_order<T>(b);
    write_rows(out + b.offset + begin * b.stride, begin, end, b.width, b.stride, V, store,
               [&](int64_t r, int64_t lo, int64_t hi, T* dst) {
      // Copies, not the captured references: the stores below are memcpy's,
      // which may alias whatever a reference reaches, and a loop that must
      // reload f's arrays after each store is not vectorized (the eval of
      // channels-last bfloat16 [32, 64, 56, 56] took 14 times as long, with
      // write_rows not inlined).
      const F fn = f;
      const int64_t words = order.words, first = lo / V, count = hi / V - first;
      const Inputs<T, N> row = advanced(in, b.offset + r * b.stride + lo);
      T* __restrict__ row_out = dst;
      for (int64_t i = 0; i < count; ++i) {
        const auto values = unpack_words<P>(row, i);
        std::array<acc_t, V> result;
        for (int k = 0; k < V; ++k) result[k] = fn(values, k, k * words + first + i);
        store_word<P>(row_out, i, P::pack(result));
      }
    });
  });
  fence_if_streamed(store);
}

template <typename T>
void blocks_stats(const T* x, const Blocks& b, int64_t begin, int64_t end, const acc_type<T>* shift,
                  ShiftedSums* totals) {
  using acc_t = acc_type<T>;
  std::vector<double> sum(b.channels, 0.0), sum_sq(b.channels, 0.0);
  sum_blocks(b, begin, end, Inputs<T, 1>{x}, [shift](const auto& v, int k, int64_t lane, acc_t& s1, acc_t& s2) {
    add_shifted_terms(v[0][k], shift[lane], s1, s2);
  }, sum.data(), sum_sq.data());
  const int64_t count = (end - begin) * (b.width / b.channels);
  for (int64_t c = 0; c < b.channels; ++c) {
    totals[c].sum += sum[c];
    totals[c].sum_sq += sum_sq[c];
    totals[c].count += count;
  }
}

// With `dz`, as run_grad_sums: kCachedValues values of rows at a time, written and then summed.
template <typename T, typename Act>
void blocks_grad_sums(const T* dy, const T* x, T* dz, const Blocks& b, int64_t begin, int64_t end,
                      const acc_type<T>* mean, const acc_type<T>* scale, const acc_type<T>* bias, acc_type<T> param,
                      double* sum_dy, double* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  if (dz == nullptr) {
    sum_blocks(b, begin, end, Inputs<T, 2>{dy, x}, [=](const auto& v, int k, int64_t lane, acc_t& a, acc_t& s) {
      const acc_t dz_k = grad_before_activation<Act>(v[0][k], v[1][k], mean[lane], scale[lane], bias[lane], param);
      add_grad_terms(dz_k, v[1][k], mean[lane], a, s);
    }, sum_dy, sum_dy_xmu);
    return;
  }
  const int64_t rows_in_cache = std::max<int64_t>(1, kCachedValues / b.width);
  for (int64_t lo = begin; lo < end; lo += rows_in_cache) {
    const int64_t hi = std::min(end, lo + rows_in_cache);
    map_blocks(b, lo, hi, Inputs<T, 2>{dy, x}, dz, Store::kCached, [=](const auto& v, int k, int64_t lane) {
      return grad_before_activation<Act>(v[0][k], v[1][k], mean[lane], scale[lane], bias[lane], param);
    });
    sum_blocks(b, lo, hi, Inputs<T, 2>{dz, x}, [=](const auto& v, int k, int64_t lane, acc_t& a, acc_t& s) {
      add_grad_terms(v[0][k], v[1][k], mean[lane], a, s);
    }, sum_dy, sum_dy_xmu);
  }
}

template <typename T, typename Act>
void blocks_normalize(const T* x, T* y, const Blocks& b, int64_t begin, int64_t end,
                      const acc_type<T>* mean, const acc_type<T>* scale, const acc_type<T>* bias, acc_type<T> param,
                      Store store) {
  map_blocks(b, begin, end, Inputs<T, 1>{x}, y, store, [=](const auto& v, int k, int64_t lane) {
    return normalize_activate<Act>(v[0][k], mean[lane], scale[lane], bias[lane], param);
  });
}

template <typename T, typename Act>
void blocks_grad_input(const T* dy, const T* x, T* dx, const Blocks& b, int64_t begin, int64_t end,
                       const GradInputLanes<acc_type<T>>& k, acc_type<T> param, Store store) {
  using acc_t = acc_type<T>;
  // The arrays by value: through `k`, every store to dx could have moved them.
  const acc_t *mean = k.mean, *scale = k.scale, *shift = k.shift, *mean_dy = k.mean_dy, *proj = k.proj;
  map_blocks(b, begin, end, Inputs<T, 2>{dy, x}, dx, store, [=](const auto& v, int i, int64_t lane) {
    const GradInputCoefficients<acc_t> lane_k{mean[lane], scale[lane], shift[lane], mean_dy[lane], proj[lane]};
    const acc_t dz = grad_before_activation<Act>(v[0][i], v[1][i], lane_k.mean, lane_k.scale, lane_k.shift, param);
    return grad_input_value(dz, v[1][i], lane_k);
  });
}

template <typename T, typename Act>
KernelTable<T> make_table(Act) {
  return {&plane_stats<T>,  &plane_normalize<T, Act>,  &plane_grad_sums<T, Act>,  &plane_grad_input<T, Act>,
          &rows_stats<T>,   &rows_normalize<T, Act>,   &rows_grad_sums<T, Act>,   &rows_grad_input<T, Act>,
          &blocks_stats<T>, &blocks_normalize<T, Act>, &blocks_grad_sums<T, Act>, &blocks_grad_input<T, Act>};
}

// The tables for every activation, in the order of Activation.
template <typename T>
std::array<KernelTable<T>, size_t(Activation::kCount)> make_tables() {
  std::array<KernelTable<T>, size_t(Activation::kCount)> tables;
  for (size_t a = 0; a < tables.size(); ++a)
    with_activation(Activation(a), [&](auto act) { tables[a] = make_table<T>(act); });
  return tables;
}
