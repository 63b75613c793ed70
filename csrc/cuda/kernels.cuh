// Device code of the safebn CUDA ops. Four kernel templates -- a per-channel
// reduction and an elementwise map, for each of the two layouts -- take an op
// that says what one element contributes and what a channel's total becomes.
// A reduction finishes in one launch: the last block of a channel's blocks to
// arrive merges their partial totals, and the last of those runs the op's
// grid epilogue (the running-statistics guard of a training forward). A
// single-block kernel applies the guard for the split ops. Every formula
// comes from welford.h and guard.h, the functions the CPU kernels call.
#pragma once

#include <cstdint>

#include "../activation.h"
#include "../guard.h"
#include "../welford.h"
#include "launch.cuh"
#include "reduce.cuh"

namespace safebn {
namespace cuda {

// ---- the guard (guard.h), by the threads of one block -----------------------
// C is small next to any activation, and a single block decides for every
// channel at once (all-or-nothing) without another launch or a host round
// trip. It runs as the statistics reduction's grid epilogue in a training
// forward, in block (0, 0) of eval's normalization, and as a one-block
// kernel of its own for the split ops.

struct BlockTeam {
  __device__ int64_t first() const { return threadIdx.y * blockDim.x + threadIdx.x; }
  __device__ int64_t stride() const { return blockDim.x * blockDim.y; }
  __device__ ChannelFaults total(const ChannelFaults& faults) const { return block_reduce(faults); }
  __device__ bool leader() const { return threadIdx.x == 0 && threadIdx.y == 0; }
  __device__ void sync() const { __syncthreads(); }
};

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) update_running_stats_kernel(UpdateArgs<acc_t> args) {
  guarded_update(args, BlockTeam{});
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) check_running_stats_kernel(EvalCheckArgs<acc_t> args) {
  check_eval(args, BlockTeam{});
}

// ---- the ops ---------------------------------------------------------------
// The elementwise ops come in two forms: without an activation (kFused
// false), the batch norm alone as it always ran, and with one chosen at run
// time (activation.h's activate), one branch every thread takes alike; a
// template per activation would multiply the kernels and the build.

template <bool kFused, typename acc_t>
__device__ __forceinline__ acc_t fused_activate(Activation kind, acc_t z, acc_t param) {
  if constexpr (kFused) return activate(kind, z, param);
  return z;
}

template <bool kFused, typename acc_t>
__device__ __forceinline__ acc_t fused_derivative(Activation kind, acc_t z, acc_t param) {
  if constexpr (kFused) return activation_derivative(kind, z, param);
  return acc_t(1);
}

// A reduction op gives: State (per thread, then merged), Channel (per-channel
// constants), kInputs (1: x; 2: dy and x), channel(c, first value of in0 in
// channel c), add(state, channel, in0, in1), finish(c, channel, total), and
// has_epilogue() / epilogue(), which one block runs with its every thread
// after every channel is finished. A map op gives Channel, kInputs,
// channel(c), apply(channel, in0, in1), and once(), which block (0, 0) runs
// with its every thread before it maps.

// Mean and biased variance of x (forward_train, batch_stats); the second
// output is invstd or the variance. Welford runs on x - shift, with the
// channel's first value as the shift, from the first add to finish (every
// block of a channel shifts alike, so partial states merge as they are): with
// a large common offset (1e4 + N(0, 1)) a float32 running mean near the
// offset cannot absorb increments below half its ulp, and the variance would
// drift by the mean's error squared.
template <typename acc_t>
struct MomentsOp {
  using accumulate_t = acc_t;
  using State = Welford<acc_t>;
  struct Channel {
    acc_t shift;
  };
  static constexpr int kInputs = 1;

  acc_t* mean;
  acc_t* spread;
  bool spread_is_invstd;
  acc_t eps;
  // A training forward's guarded update, once every channel is final
  // (guard false for batch_stats).
  bool guard;
  UpdateArgs<acc_t> update;

  __device__ Channel channel(int64_t, acc_t first) const { return {first}; }
  __device__ void add(State& s, const Channel& k, acc_t x, acc_t) const { s.add(x - k.shift); }
  __device__ void finish(int64_t c, const Channel& k, const State& s) const {
    mean[c] = k.shift + s.mean;
    spread[c] = spread_is_invstd ? invstd_from_var(s.variance(), eps) : s.variance();
  }
  __device__ bool has_epilogue() const { return guard; }
  __device__ void epilogue() const { guarded_update(update, BlockTeam{}); }
};

// sum(dz) and sum(dz * (x - mean)) (backward, backward_reduce), dz = dy *
// act'(z) with the forward's output before its activation z = (x - mean) *
// weight * invstd + bias recomputed; with `grad_weight`, also sum(dz * xhat)
// = sum_dy_xmu * invstd.
template <typename acc_t, bool kFused>
struct GradSumsOp {
  using accumulate_t = acc_t;
  using State = GradSums<acc_t>;
  struct Channel {
    acc_t mean, scale, shift;
  };
  static constexpr int kInputs = 2;

  const acc_t* mean;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  const acc_t* invstd;  // read with grad_weight or an activation
  acc_t* grad_weight;   // nullptr: not wanted
  const acc_t* weight;  // nullptr: 1
  const acc_t* bias;    // nullptr: 0
  Activation activation;
  acc_t activation_param;

  __device__ Channel channel(int64_t c, acc_t) const {
    if constexpr (!kFused) return {mean[c], acc_t(1), acc_t(0)};
    return {mean[c], value_or(weight, c, acc_t(1)) * invstd[c], value_or(bias, c, acc_t(0))};
  }
  __device__ void add(State& s, const Channel& k, acc_t dy, acc_t x) const {
    const acc_t dz = dy * fused_derivative<kFused>(activation, normalize_value(x, k.mean, k.scale, k.shift),
                                                   activation_param);
    s.dy += dz;
    s.dy_xmu += dz * (x - k.mean);
  }
  __device__ void finish(int64_t c, Channel, const State& s) const {
    sum_dy[c] = s.dy;
    sum_dy_xmu[c] = s.dy_xmu;
    if (grad_weight != nullptr) grad_weight[c] = s.dy_xmu * invstd[c];
  }
  __device__ bool has_epilogue() const { return false; }
  __device__ void epilogue() const {}
};

// y = act((x - mean) * weight * invstd + bias) (batch_norm_train,
// batch_norm_eval, normalize). batch_norm_eval hands the running variance,
// from which invstd is derived once per channel.
template <typename acc_t, bool kFused>
struct NormalizeOp {
  using accumulate_t = acc_t;
  struct Channel {
    acc_t mean, scale, shift;
  };
  static constexpr int kInputs = 1;

  const acc_t* mean;
  const acc_t* spread;  // invstd, or the variance when spread_is_var
  bool spread_is_var;
  acc_t eps;
  const acc_t* weight;  // nullptr: 1
  const acc_t* bias;    // nullptr: 0
  Activation activation;
  acc_t activation_param;
  // eval mode: the running statistics' check, in the same launch (counters nullptr: none)
  EvalCheckArgs<acc_t> check;

  __device__ Channel channel(int64_t c) const {
    const acc_t invstd = spread_is_var ? invstd_from_var(spread[c], eps) : spread[c];
    return {mean[c], value_or(weight, c, acc_t(1)) * invstd, value_or(bias, c, acc_t(0))};
  }
  __device__ acc_t apply(const Channel& k, acc_t x, acc_t) const {
    return fused_activate<kFused>(activation, normalize_value(x, k.mean, k.scale, k.shift), activation_param);
  }
  __device__ void once() const { check_eval(check, BlockTeam{}); }
};

// The input gradient (backward, backward_elemt), of dz = dy * act'(z) as
// GradSumsOp. Without the sums (eval-mode backward, which does not need
// them) they read as 0.
template <typename acc_t, bool kFused>
struct GradInputOp {
  using accumulate_t = acc_t;
  using Channel = GradInputCoefficients<acc_t>;
  static constexpr int kInputs = 2;

  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;      // nullptr: 1
  const acc_t* bias;        // nullptr: 0
  const acc_t* sum_dy;      // nullptr: 0
  const acc_t* sum_dy_xmu;  // nullptr: 0
  acc_t count;
  bool train;
  Activation activation;
  acc_t activation_param;

  __device__ Channel channel(int64_t c) const {
    return grad_input_coefficients<acc_t>(mean[c], invstd[c], value_or(weight, c, acc_t(1)),
                                          value_or(bias, c, acc_t(0)), value_or(sum_dy, c, acc_t(0)),
                                          value_or(sum_dy_xmu, c, acc_t(0)), count, train);
  }
  __device__ acc_t apply(const Channel& k, acc_t dy, acc_t x) const {
    const acc_t dz = dy * fused_derivative<kFused>(activation, normalize_value(x, k.mean, k.scale, k.shift),
                                                   activation_param);
    return grad_input_value(dz, x, k);
  }
  __device__ void once() const {}
};

// ---- contiguous layouts: blocks over rectangles of one channel's runs -----

// (a / b, a % b) for 0 <= a < 2^31 and b > 0 in 32-bit arithmetic: a 64-bit
// division is a slow subroutine call, whose calling convention also costs
// the kernel registers.
__device__ __forceinline__ void divmod_small(int a, int64_t b, int64_t& quotient, int64_t& remainder) {
  if (b > a) {
    quotient = 0;
    remainder = a;
  } else {
    quotient = unsigned(a) / unsigned(b);
    remainder = unsigned(a) % unsigned(b);
  }
}

// The packs of a block's rectangle of channel c: `rows` runs from run n0, in
// each `width` packs from s0. Thread t visits the rectangle's packs t,
// t + blockDim.x, ... in row-major order and yields their offsets in the
// tensor, carrying its (row, position) along so that a step costs adds and a
// compare rather than a division.
struct PlaneWalker {
  int64_t row, rows;         // the current run, relative to n0; the block's runs
  int64_t s, width;          // the position in the run, relative to s0; packs per run
  int64_t row_step, s_step;  // what a step of blockDim.x adds to each, before s wraps
  int64_t row_start;         // pack offset of (n0 + row, c, s0)
  int64_t stride;            // packs from one run of the channel to the next: C * run

  __device__ explicit PlaneWalker(const PlaneShape& shape, int64_t c) {
    const int64_t row_block = blockIdx.y / unsigned(shape.width_splits);
    const int64_t width_block = blockIdx.y % unsigned(shape.width_splits);
    const int64_t n0 = row_block * shape.block_rows, s0 = width_block * shape.block_width;
    rows = shape.block_rows < shape.batch - n0 ? shape.block_rows : shape.batch - n0;
    width = shape.block_width < shape.run - s0 ? shape.block_width : shape.run - s0;
    divmod_small(threadIdx.x, width, row, s);
    divmod_small(blockDim.x, width, row_step, s_step);
    stride = shape.channels * shape.run;
    row_start = (n0 + row) * stride + c * shape.run + s0;
  }

  __device__ bool done() const { return row >= rows; }
  __device__ int64_t offset() const { return row_start + s; }
  __device__ void advance() {
    row += row_step;
    row_start += row_step * stride;
    s += s_step;
    if (s >= width) {
      s -= width;
      ++row;
      row_start += stride;
    }
  }
};

// Grid (C, rectangles per channel), 1-D blocks. Each thread folds its packs
// into one State, the block merges them, and the channel's last block to
// arrive merges the blocks' totals.
template <typename Op, typename scalar_t, int V>
__global__ void __launch_bounds__(kBlockThreads)
plane_reduce_kernel(Op op, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1, PlaneShape shape,
                    typename Op::State* __restrict__ partials, GridCounters counters) {
  using acc_t = typename Op::accumulate_t;
  const int64_t c = blockIdx.x;
  const typename Op::Channel channel = op.channel(c, first_value<acc_t>(in0, c, shape.run * V));
  typename Op::State state;
  for (PlaneWalker walk(shape, c); !walk.done();) {
    Pack<scalar_t, V> a[kUnroll], b[kUnroll] = {};
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load issued before the first use
      valid[u] = !walk.done();
      if (valid[u]) {
        a[u] = load_pack<V>(in0, walk.offset());
        if constexpr (Op::kInputs == 2) b[u] = load_pack<V>(in1, walk.offset());
      }
      walk.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!valid[u]) continue;
#pragma unroll
      for (int v = 0; v < V; ++v) op.add(state, channel, acc_t(a[u].value[v]), acc_t(b[u].value[v]));
    }
  }
  state = block_reduce(state);
  if (gridDim.y > 1) {
    const int64_t splits = gridDim.y;
    if (threadIdx.x == 0) partials[c * splits + blockIdx.y] = state;
    if (!arrive_last(&counters.tile_arrivals[blockIdx.x], gridDim.y)) return;
    // In a fixed order, whichever block arrives last: deterministic results.
    state = typename Op::State();
    for (int64_t split = threadIdx.x; split < splits; split += blockDim.x) combine(state, load_partial(partials + c * splits + split));
    state = block_reduce(state);
  }
  if (threadIdx.x == 0) op.finish(c, channel, state);
  if (op.has_epilogue() && arrive_last(counters.tiles_done, gridDim.x)) op.epilogue();
}

// Grid (C, rectangles per channel), 1-D blocks, the walk of plane_reduce_kernel.
template <typename Op, typename scalar_t, int V>
__global__ void __launch_bounds__(kBlockThreads)
plane_map_kernel(Op op, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
                 scalar_t* __restrict__ out, PlaneShape shape) {
  using acc_t = typename Op::accumulate_t;
  if (blockIdx.x == 0 && blockIdx.y == 0) op.once();
  const int64_t c = blockIdx.x;
  const typename Op::Channel channel = op.channel(c);
  for (PlaneWalker walk(shape, c); !walk.done();) {
    Pack<scalar_t, V> a[kUnroll], b[kUnroll] = {};
    int64_t offset[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      valid[u] = !walk.done();
      offset[u] = walk.offset();
      if (valid[u]) {
        a[u] = load_pack<V>(in0, offset[u]);
        if constexpr (Op::kInputs == 2) b[u] = load_pack<V>(in1, offset[u]);
      }
      walk.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!valid[u]) continue;
      Pack<scalar_t, V> result;
#pragma unroll
      for (int v = 0; v < V; ++v)
        result.value[v] = scalar_t(op.apply(channel, acc_t(a[u].value[v]), acc_t(b[u].value[v])));
      store_pack<V>(out, offset[u], result);
    }
  }
}

// ---- channels-last layouts: threads over channels, blocks over rows -------

// The packs at `column` of rows row, row + step, ... (kUnroll of them, those
// below shape.rows) of one or two inputs, every load issued before the first
// use; rows_reduce_kernel and rows_map_kernel walk rows alike.
template <int kInputs, int V, typename scalar_t>
__device__ __forceinline__ void load_row_packs(const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
                                               RowsShape shape, int64_t row, int64_t step, int64_t column,
                                               Pack<scalar_t, V> (&a)[kUnroll], Pack<scalar_t, V> (&b)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t r = row + u * step;
    if (r < shape.rows) {
      a[u] = load_pack<V>(in0, r * shape.columns + column);
      if constexpr (kInputs == 2) b[u] = load_pack<V>(in1, r * shape.columns + column);
    }
  }
}

// Grid (column tiles, row splits), blocks (x: packs of a row, y: rows). Each
// thread keeps one State per channel of its pack while it walks rows, the
// block's rows merge in shared memory, and the tile's last block to arrive
// merges the blocks' totals.
template <typename Op, typename scalar_t, int V>
__global__ void __launch_bounds__(kBlockThreads)
rows_reduce_kernel(Op op, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1, RowsShape shape,
                   typename Op::State* __restrict__ partials, GridCounters counters) {
  using acc_t = typename Op::accumulate_t;
  using State = typename Op::State;
  __shared__ alignas(State) unsigned char storage[kBlockThreads * V * sizeof(State)];
  State* shared = reinterpret_cast<State*>(storage);

  const int64_t column = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = column < shape.columns;  // idle threads still take part in the merges
  const int64_t first_channel = column * V;
  typename Op::Channel channel[V];
  State state[V];
  if (active) {
#pragma unroll
    for (int v = 0; v < V; ++v)
      channel[v] = op.channel(first_channel + v, first_value<acc_t>(in0, first_channel + v, /*stride=*/1));
    const int64_t step = int64_t(gridDim.y) * blockDim.y;
    for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < shape.rows; row += kUnroll * step) {
      Pack<scalar_t, V> a[kUnroll], b[kUnroll] = {};
      load_row_packs<Op::kInputs>(in0, in1, shape, row, step, column, a, b);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (row + u * step >= shape.rows) continue;
#pragma unroll
        for (int v = 0; v < V; ++v) op.add(state[v], channel[v], acc_t(a[u].value[v]), acc_t(b[u].value[v]));
      }
    }
  }
  reduce_block_rows(state, shared);
  if (gridDim.y > 1) {
    const int64_t splits = gridDim.y;
    if (active && threadIdx.y == 0) {
#pragma unroll
      for (int v = 0; v < V; ++v) partials[(first_channel + v) * splits + blockIdx.y] = state[v];
    }
    if (!arrive_last(&counters.tile_arrivals[blockIdx.x], gridDim.y)) return;
    // Rows of threads over the splits, in a fixed order: deterministic results.
#pragma unroll
    for (int v = 0; v < V; ++v) state[v] = State();
    if (active) {
      for (int64_t split = threadIdx.y; split < splits; split += blockDim.y) {
#pragma unroll
        for (int v = 0; v < V; ++v) combine(state[v], load_partial(partials + (first_channel + v) * splits + split));
      }
    }
    reduce_block_rows(state, shared);
  }
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int v = 0; v < V; ++v) op.finish(first_channel + v, channel[v], state[v]);
  }
  if (op.has_epilogue() && arrive_last(counters.tiles_done, gridDim.x)) op.epilogue();
}

// Grid (column tiles, row splits), the same shape as rows_reduce_kernel: each
// thread loads its channels' constants once and walks rows.
template <typename Op, typename scalar_t, int V>
__global__ void __launch_bounds__(kBlockThreads)
rows_map_kernel(Op op, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
                scalar_t* __restrict__ out, RowsShape shape) {
  using acc_t = typename Op::accumulate_t;
  if (blockIdx.x == 0 && blockIdx.y == 0) op.once();
  const int64_t column = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= shape.columns) return;
  typename Op::Channel channel[V];
#pragma unroll
  for (int v = 0; v < V; ++v) channel[v] = op.channel(column * V + v);
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < shape.rows; row += kUnroll * step) {
    Pack<scalar_t, V> a[kUnroll], b[kUnroll] = {};
    load_row_packs<Op::kInputs>(in0, in1, shape, row, step, column, a, b);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t r = row + u * step;
      if (r >= shape.rows) continue;
      Pack<scalar_t, V> result;
#pragma unroll
      for (int v = 0; v < V; ++v)
        result.value[v] = scalar_t(op.apply(channel[v], acc_t(a[u].value[v]), acc_t(b[u].value[v])));
      store_pack<V>(out, r * shape.columns + column, result);
    }
  }
}

}  // namespace cuda
}  // namespace safebn
