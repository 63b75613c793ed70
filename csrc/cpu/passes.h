// The passes of the CPU ops over a batch-norm input: how each is split into
// tasks (Plan) and walked with the kernels of kernels.h, the reductions fused
// with their elementwise pass where a channel stays in cache. Included by
// batch_norm_cpu.cpp alone.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>
#include <utility>

#include "../activation.h"
#include "../geometry.h"
#include "../layout.h"
#include "../welford.h"
#include "kernels.h"

namespace safebn {
namespace cpu_passes {

// Per-channel and per-lane scratch: on the stack for the few channels of a
// small batch, whose kernels cost less than a heap allocation each.
template <typename T>
using ChannelVector = c10::SmallVector<T, 64>;

// How every pass walks the input. Contiguous inputs with long rows (S of a
// few thousand) go channel by channel ("planes"): one task per channel while
// there are enough channels to keep every thread busy, so that a channel is
// still in cache between its reduction and its elementwise pass; otherwise
// several tasks per channel over slices of its plane. Reductions over
// contiguous rows of a few hundred values walk the (n, c) rows in memory
// order, each row's sums added to its channel's: one stream through memory,
// where the strips of Blocks would read rows C * S apart (2 to 3 times
// slower on [32, 256, 16, 16], whose stride is a power of two). Everything
// else goes in memory order as rows of Blocks (kernels.h), split into row
// ranges. An elementwise pass on its own over a contiguous input walks its
// (n, c) rows in memory order when they are long enough for a loop with the
// channel's constants in registers, rather than per-lane constants from memory.
struct Plan {
  bool planes = false;
  bool elementwise_by_rows = false;
  bool reductions_by_rows = false;
  int64_t slices = 1;     // planes: tasks per channel
  int64_t slice_len = 0;  // planes: plane indices per task
  // blocks: the rows the tasks share, then channels-last rows too few to fill one.
  std::array<cpu::Blocks, 2> blocks;
  int64_t tasks = 1;      // blocks: row ranges of blocks[0]
  int64_t row_tasks = 1;  // passes by rows: ranges of (n, c) rows
  bool fused() const { return planes && slices == 1; }
};

Plan plan_for(const Geometry& g) {
  constexpr int64_t kLongRun = 512, kMinSlice = 4096, kMinBlockWidth = 256, kMinElementwiseRow = 32,
                    kMinReductionRow = 64, kMinTaskValues = 16384;
  // Rows reduced one by one are written one by one too: the plan leaves no blocks.
  static_assert(kMinReductionRow >= kMinElementwiseRow, "reductions by rows need elementwise passes by rows");
  const int64_t threads = at::get_num_threads(), C = g.channels, S = g.spatial;
  Plan p;
  p.elementwise_by_rows = !g.channels_last && S >= kMinElementwiseRow;
  p.row_tasks = std::clamp<int64_t>(g.batch * C * S / kMinTaskValues, 1, threads);
  if (!g.channels_last && S >= kLongRun) {
    p.planes = true;
    const int64_t per_channel = g.per_channel();
    if (C < 4 * threads && per_channel >= 2 * kMinSlice)
      p.slices = std::min(at::divup(4 * threads, C), per_channel / kMinSlice);
    p.slice_len = at::divup(per_channel, p.slices);
    return p;
  }
  if (!g.channels_last && S >= kMinReductionRow) {
    p.reductions_by_rows = true;
    return p;
  }
  if (!g.channels_last) {
    p.blocks[0] = {0, g.batch, C * S, C * S, S, C};
  } else {
    // Blocks of whole rows at least kMinBlockWidth values wide, for C = 3
    // too, and of an even width, which bfloat16 reads in pairs.
    int64_t step = at::divup(kMinBlockWidth, C);
    step += (step * C) % 2;
    const int64_t full = g.rows() / step;
    p.blocks[0] = {0, full, step * C, step * C, 1, C};
    p.blocks[1] = {full * step * C, g.rows() - full * step, C, C, 1, C};
  }
  const int64_t min_rows_per_task = std::max<int64_t>(1, kMinTaskValues / std::max<int64_t>(1, p.blocks[0].width));
  p.tasks = std::max<int64_t>(1, std::min(threads, p.blocks[0].rows / min_rows_per_task));
  return p;
}

// A slice of the batch with statistics of its own: the whole batch, or one
// of a ghost batch norm's chunks (layout.h), `offset` values into each of an
// op's tensors, with its geometry and plan. Chunks differ in their batch
// alone, so every plan walks them the same way (planes, rows or blocks); only
// whether planes are fused may differ. The passes' per-channel arrays hold a
// row of C values per chunk, chunk after chunk.
struct Chunk {
  int64_t offset = 0;
  Geometry g;
  Plan plan;
};

// Each pass runs the tasks of every chunk in one parallel region (Tasks), as
// many regions as for the whole batch: each region waits for its slowest
// thread, and with a region per chunk a ghost batch norm's training forward +
// backward ([64, 64, 56, 56], 4 chunks) took 1.2 to 3.8 times the plain
// one's on 2 threads whose cores were busy with other work too (on 1 thread,
// or on idle cores, the same time).
using Chunks = c10::SmallVector<Chunk, 4>;

Chunks chunks_of(const Geometry& g, int64_t virtual_batch_size = 0) {
  Chunks chunks;
  for (int64_t index = 0; index < chunk_count(g.batch, virtual_batch_size); ++index) {
    const int64_t first = index * virtual_batch_size;
    Geometry chunk = g;
    if (virtual_batch_size > 0) chunk.batch = std::min(virtual_batch_size, g.batch - first);
    chunks.push_back({first * g.channels * g.spatial, chunk, plan_for(chunk)});
    // The passes read how to walk every chunk from the first: plan_for decides it from the layout and S alone.
    TORCH_INTERNAL_ASSERT(chunks.back().plan.planes == chunks[0].plan.planes &&
                          chunks.back().plan.elementwise_by_rows == chunks[0].plan.elementwise_by_rows &&
                          chunks.back().plan.reductions_by_rows == chunks[0].plan.reductions_by_rows);
  }
  return chunks;
}

// The tasks of one pass, count(chunk) per chunk, numbered across the chunks
// ("slots", chunk after chunk).
class Tasks {
 public:
  template <typename Count>
  Tasks(const Chunks& chunks, Count count) : first_(chunks.size() + 1, 0) {
    for (size_t i = 0; i < chunks.size(); ++i) first_[i + 1] = first_[i] + count(chunks[i]);
  }
  int64_t size() const { return first_.back(); }
  // The slots of chunk i: [first(i), first(i + 1)).
  int64_t first(size_t i) const { return first_[i]; }

  // fn(i, task, slot) for task `task` of chunk i, every task in one parallel region.
  template <typename Fn>
  void run(Fn fn) const {
    at::parallel_for(0, size(), 1, [&](int64_t begin, int64_t end) {
      size_t i = std::upper_bound(first_.begin(), first_.end(), begin) - first_.begin() - 1;
      for (int64_t slot = begin; slot < end; ++slot) {
        while (slot >= first_[i + 1]) ++i;
        fn(i, slot - first_[i], slot);
      }
    });
  }

 private:
  ChannelVector<int64_t> first_;
};

// Task `task` of a reduction over planes: channel c's plane indices [lo, hi).
struct PlaneSlice {
  int64_t c, lo, hi;
};

PlaneSlice plane_slice(const Chunk& chunk, int64_t task) {
  const Plan& p = chunk.plan;
  const int64_t c = task / p.slices, lo = (task % p.slices) * p.slice_len;
  return {c, lo, std::min(lo + p.slice_len, chunk.g.per_channel())};
}

// The range of (n, c) rows, in memory order, of task `task` of a pass by rows.
std::pair<int64_t, int64_t> row_task_range(const Geometry& g, const Plan& p, int64_t task) {
  const int64_t rows = g.batch * g.channels, per_task = at::divup(rows, p.row_tasks);
  return {std::min(rows, task * per_task), std::min(rows, (task + 1) * per_task)};
}

// Task `task` of a pass over p.blocks: a range of the rows of blocks[0], or,
// last, the leftover rows of blocks[1].
struct BlockRange {
  int block;
  int64_t lo, hi;
};

BlockRange block_range(const Plan& p, int64_t task) {
  if (task == p.tasks) return {1, 0, p.blocks[1].rows};
  // The last tasks may have no rows (5 rows in 4 tasks of 2): an empty range,
  // not a reversed one, whose negative count blocks_stats would add.
  const int64_t rows = at::divup(p.blocks[0].rows, p.tasks), end = p.blocks[0].rows;
  return {0, std::min(task * rows, end), std::min((task + 1) * rows, end)};
}

// The tasks of a pass by rows (`by_rows`) or over p.blocks.
int64_t range_tasks(const Plan& p, bool by_rows) {
  return by_rows ? p.row_tasks : p.tasks + (p.blocks[1].rows > 0 ? 1 : 0);
}

// The tasks of a chunk's reduction: a fused or sliced plane per task, or ranges of rows.
int64_t reduction_tasks(const Chunk& chunk) {
  const Plan& p = chunk.plan;
  return p.planes ? chunk.g.channels * p.slices : range_tasks(p, p.reductions_by_rows);
}

// The tasks of a chunk's elementwise pass: none after its reduction
// (`after_reduction`) where that was fused and wrote it.
int64_t elementwise_tasks(const Chunk& chunk, bool after_reduction) {
  const Plan& p = chunk.plan;
  return after_reduction && p.fused() ? 0 : range_tasks(p, p.elementwise_by_rows);
}

// The tasks of an elementwise pass over every chunk.
Tasks elementwise_pass(const Chunks& chunks, bool after_reduction) {
  return Tasks(chunks, [&](const Chunk& chunk) { return elementwise_tasks(chunk, after_reduction); });
}

// fn(lo, hi) over rows [lo, hi) of `row_values` values each: at once, or,
// for an elementwise pass right after its reduction (`backwards`), from the
// end back to the start, a piece of about kPieceValues values at a time,
// each piece forwards as the prefetchers expect. The reduction read the range
// from start to end, so its end is what the last-level cache still holds:
// over an input larger than that cache, the pass reads part of it from the
// cache rather than from memory.
template <typename Fn>
void walk_rows(int64_t lo, int64_t hi, int64_t row_values, bool backwards, Fn fn) {
  constexpr int64_t kPieceValues = int64_t(1) << 17;
  if (!backwards) return fn(lo, hi);
  const int64_t piece = std::max<int64_t>(1, kPieceValues / std::max<int64_t>(1, row_values));
  for (int64_t end = hi; end > lo; end -= piece) fn(std::max(lo, end - piece), end);
}

// fn(i, chunk, lo, hi) for each task of a pass by rows: chunk i's (n, c)
// rows [lo, hi), walked backwards after a reduction (walk_rows).
template <typename Fn>
void run_by_rows(const Tasks& tasks, const Chunks& chunks, bool after_reduction, Fn fn) {
  tasks.run([&](size_t i, int64_t task, int64_t) {
    const auto [lo, hi] = row_task_range(chunks[i].g, chunks[i].plan, task);
    walk_rows(lo, hi, chunks[i].g.spatial, after_reduction,
              [&](int64_t first, int64_t last) { fn(i, chunks[i], first, last); });
  });
}

// fn(i, chunk, range) for each task of a pass over blocks: a BlockRange of
// chunk i, walked backwards after a reduction (walk_rows).
template <typename Fn>
void run_by_blocks(const Tasks& tasks, const Chunks& chunks, bool after_reduction, Fn fn) {
  tasks.run([&](size_t i, int64_t task, int64_t) {
    const BlockRange r = block_range(chunks[i].plan, task);
    walk_rows(r.lo, r.hi, chunks[i].plan.blocks[r.block].width, after_reduction,
              [&](int64_t first, int64_t last) { fn(i, chunks[i], BlockRange{r.block, first, last}); });
  });
}

// How a pass over every chunk writes its output (cpu::Store), `tensors`
// being how many tensors of the input's size it reads and writes: streamed
// once they take 48 MiB, well past the 32 MB last-level cache of the
// machines measured, which other processes share. In standalone loops on the
// AMD EPYC VM (2 threads, AVX-512), streaming took 10 to 32% less time over
// 34 MB and more in all (y = a * x + b, 17 to 52 MB per tensor; dx = a * dy
// + b * x, 17 to 105 MB), about as long over 25 MB (three tensors of 8 MB, or two
// of 13 MB: -4 to +7%), and 12 to 22% more over 17 MB in two tensors.
template <typename T>
cpu::Store output_store(const Chunks& chunks, int64_t tensors) {
  constexpr int64_t kStreamFromBytes = int64_t(48) << 20;
  int64_t values = 0;
  for (const Chunk& chunk : chunks) values += chunk.g.batch * chunk.g.channels * chunk.g.spatial;
  return tensors * values * int64_t(sizeof(T)) >= kStreamFromBytes ? cpu::Store::kStreamed : cpu::Store::kCached;
}

// The input gradient's: dy, x and dx, or, computed in place from dz
// (`in_place`), cached: each line of dx was just read as dz, so a plain store
// reads nothing from memory, and a streamed one would only evict it.
template <typename T>
cpu::Store input_gradient_store(const Chunks& chunks, bool in_place) {
  return in_place ? cpu::Store::kCached : output_store<T>(chunks, 3);
}

// A per-channel array (a row of C per chunk) repeated over the lanes of a row
// of each of every chunk's blocks, in the order the kernels for T read them
// (cpu::lane_order); (i, block): chunk i's for p.blocks[block]. Empty for
// plans without blocks.
template <typename T, typename acc_t>
class Tiled {
 public:
  Tiled(const Chunks& chunks, const acc_t* per_channel) : lanes_(2 * chunks.size()) {
    for (size_t i = 0; i < chunks.size(); ++i) {
      const int64_t row = i * chunks[i].g.channels;
      for (int block = 0; block < 2; ++block) {
        const cpu::Blocks& b = chunks[i].plan.blocks[block];
        const cpu::LaneOrder order = cpu::lane_order<T>(b);
        ChannelVector<acc_t>& lanes = lanes_[2 * i + block];
        lanes.resize(b.width);
        b.for_each_channel_span(0, b.width, [&](int64_t first, int64_t last, int64_t c) {
          for (int64_t j = first; j < last; ++j) lanes[order.index(j)] = per_channel[row + c];
        });
      }
    }
  }
  const acc_t* operator()(size_t i, int block) const { return lanes_[2 * i + block].data(); }

 private:
  c10::SmallVector<ChannelVector<acc_t>, 2> lanes_;
};

// Per-channel constants of y = act((x - mean) * scale + bias), which the
// backward recomputes for the activation's derivative.
template <typename acc_t>
struct NormalizeParams {
  ChannelVector<acc_t> mean, scale, bias;
  ActivationArg activation;
  NormalizeParams(int64_t channels, ActivationArg activation)
      : mean(channels), scale(channels), bias(channels), activation(activation) {}
  void set(int64_t c, acc_t m, acc_t s, acc_t b) { mean[c] = m; scale[c] = s; bias[c] = b; }
  acc_t param() const { return acc_t(activation.param); }
};

template <typename T, typename acc_t>
void normalize_all(const T* x, T* y, const Chunks& chunks, const NormalizeParams<acc_t>& k,
                   bool after_reduction = false) {
  const auto& kern = cpu::kernels<T>(k.activation.kind);
  const int64_t C = chunks[0].g.channels;
  const Tasks tasks = elementwise_pass(chunks, after_reduction);
  const cpu::Store store = output_store<T>(chunks, 2);  // x, y
  if (chunks[0].plan.elementwise_by_rows) {
    run_by_rows(tasks, chunks, after_reduction, [&](size_t i, const Chunk& chunk, int64_t lo, int64_t hi) {
      kern.rows_normalize(x + chunk.offset, y + chunk.offset, chunk.g, lo, hi, k.mean.data() + i * C,
                          k.scale.data() + i * C, k.bias.data() + i * C, k.param(), store);
    });
    return;
  }
  const Tiled<T, acc_t> mean(chunks, k.mean.data()), scale(chunks, k.scale.data()), bias(chunks, k.bias.data());
  run_by_blocks(tasks, chunks, after_reduction, [&](size_t i, const Chunk& chunk, const BlockRange& r) {
    kern.blocks_normalize(x + chunk.offset, y + chunk.offset, chunk.plan.blocks[r.block], r.lo, r.hi,
                          mean(i, r.block), scale(i, r.block), bias(i, r.block), k.param(), store);
  });
}

// Reduces every channel of every chunk to its Welford statistics and hands
// each to `finish(i, c, stats)` (chunk i), which fills `params` for the
// normalization that follows when `y` is given. Fused per channel where a
// chunk's plan allows.
template <typename T, typename acc_t, typename Finish>
void reduce_channels(const T* x, T* y, const Chunks& chunks, NormalizeParams<acc_t>& params, Finish finish) {
  const auto& k = cpu::kernels<T>(params.activation.kind);
  const int64_t C = chunks[0].g.channels;
  const bool planes = chunks[0].plan.planes;
  const Tasks tasks(chunks, reduction_tasks);
  const cpu::Store store = output_store<T>(chunks, 2);  // x, y
  // Planes not fused: a slice's statistics per task. Rows and blocks: a
  // task's sums per channel, relative to the channel's first value in the chunk.
  ChannelVector<Welford<acc_t>> slices(planes ? tasks.size() : 0);
  ChannelVector<cpu::ShiftedSums> partial(planes ? 0 : tasks.size() * C);
  ChannelVector<acc_t> shift(planes ? 0 : chunks.size() * C);
  for (int64_t j = 0; j < int64_t(shift.size()); ++j) {
    const Chunk& chunk = chunks[j / C];
    const int64_t c = j % C;
    shift[j] = cpu::load(x[chunk.offset + (chunk.g.channels_last ? c : c * chunk.g.spatial)]);
  }
  const Tiled<T, acc_t> shift_lanes(chunks, shift.data());
  tasks.run([&](size_t i, int64_t task, int64_t slot) {
    const Chunk& chunk = chunks[i];
    const Plan& p = chunk.plan;
    const T* xc = x + chunk.offset;
    if (p.planes) {
      const PlaneSlice s = plane_slice(chunk, task);
      const Welford<acc_t> stats = k.plane_stats(xc, chunk.g, s.c, s.lo, s.hi);
      if (!p.fused()) {
        slices[slot] = stats;
        return;
      }
      finish(i, s.c, stats);
      const int64_t j = i * C + s.c;
      if (y)
        k.plane_normalize(xc, y + chunk.offset, chunk.g, s.c, 0, chunk.g.per_channel(), params.mean[j],
                          params.scale[j], params.bias[j], params.param(), store);
    } else if (p.reductions_by_rows) {
      const auto [lo, hi] = row_task_range(chunk.g, p, task);
      k.rows_stats(xc, chunk.g, lo, hi, shift.data() + i * C, partial.data() + slot * C);
    } else {
      const BlockRange r = block_range(p, task);
      k.blocks_stats(xc, p.blocks[r.block], r.lo, r.hi, shift_lanes(i, r.block), partial.data() + slot * C);
    }
  });
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Plan& p = chunks[i].plan;
    if (p.fused()) continue;
    for (int64_t c = 0; c < C; ++c) {
      Welford<acc_t> total;
      if (planes) {
        for (int64_t s = 0; s < p.slices; ++s) total.merge(slices[tasks.first(i) + c * p.slices + s]);
      } else {
        for (int64_t slot = tasks.first(i); slot < tasks.first(i + 1); ++slot)
          total.merge(partial[slot * C + c].welford(shift[i * C + c]));
      }
      finish(i, c, total);
    }
  }
  if (y) normalize_all(x, y, chunks, params, /*after_reduction=*/true);
}

// sum(dy) and sum(dy * (x - mean)) per channel (a row of C per chunk), in double.
struct GradSums {
  ChannelVector<double> dy, dy_xmu;
  explicit GradSums(int64_t channels) : dy(channels, 0.0), dy_xmu(channels, 0.0) {}
};

// The input gradient from the coefficients `k` (a row of C per chunk);
// `after_reduction`: but in the chunks whose reduction was fused and wrote it.
template <typename T, typename acc_t>
void grad_input_all(const T* dy, const T* x, T* dx, const Chunks& chunks,
                    const ChannelVector<GradInputCoefficients<acc_t>>& k, ActivationArg activation,
                    bool after_reduction = false) {
  const auto& kern = cpu::kernels<T>(activation.kind);
  const acc_t param = acc_t(activation.param);
  const int64_t C = chunks[0].g.channels;
  const Tasks tasks = elementwise_pass(chunks, after_reduction);
  const cpu::Store store = input_gradient_store<T>(chunks, dy == dx);
  if (chunks[0].plan.elementwise_by_rows) {
    run_by_rows(tasks, chunks, after_reduction, [&](size_t i, const Chunk& chunk, int64_t lo, int64_t hi) {
      kern.rows_grad_input(dy + chunk.offset, x + chunk.offset, dx + chunk.offset, chunk.g, lo, hi,
                           k.data() + i * C, param, store);
    });
    return;
  }
  ChannelVector<acc_t> fields[5];
  for (auto& f : fields) f.resize(k.size());
  for (size_t j = 0; j < k.size(); ++j) {
    fields[0][j] = k[j].mean;
    fields[1][j] = k[j].scale;
    fields[2][j] = k[j].shift;
    fields[3][j] = k[j].mean_dy;
    fields[4][j] = k[j].proj;
  }
  const Tiled<T, acc_t> mean(chunks, fields[0].data()), scale(chunks, fields[1].data()),
      shift(chunks, fields[2].data()), mean_dy(chunks, fields[3].data()), proj(chunks, fields[4].data());
  run_by_blocks(tasks, chunks, after_reduction, [&](size_t i, const Chunk& chunk, const BlockRange& r) {
    const cpu::GradInputLanes<acc_t> lanes{mean(i, r.block), scale(i, r.block), shift(i, r.block),
                                           mean_dy(i, r.block), proj(i, r.block)};
    kern.blocks_grad_input(dy + chunk.offset, x + chunk.offset, dx + chunk.offset, chunk.plan.blocks[r.block],
                           r.lo, r.hi, lanes, param, store);
  });
}

// The two sums, of dz = dy * act'(z) with z the forward's output before its
// activation (`z`: the forward's constants), and, when `dx` is given, the
// input gradient from the coefficients `coeffs(i, c, sums)` returns for
// channel c of chunk i; fused per channel as above. Where
// cpu::stores_activation_grad, dz is written to dx by the reduction and the
// input gradient is the identity's, from dz in place.
template <typename T, typename acc_t, typename Coefficients>
GradSums reduce_grads(const T* dy, const T* x, T* dx, const Chunks& chunks, const NormalizeParams<acc_t>& z,
                      Coefficients coeffs) {
  const auto& k = cpu::kernels<T>(z.activation.kind);
  const ChannelVector<acc_t>& mean = z.mean;
  const acc_t param = z.param();
  const int64_t C = chunks[0].g.channels;
  const bool planes = chunks[0].plan.planes;
  T* dz = dx != nullptr && cpu::stores_activation_grad(z.activation.kind) ? dx : nullptr;
  // What the input gradient reads as its incoming gradient, and through which activation.
  const T* grad_in = dz != nullptr ? dz : dy;
  const ActivationArg input_activation = dz != nullptr ? ActivationArg{} : z.activation;
  const auto& input_kernels = cpu::kernels<T>(input_activation.kind);
  const Tasks tasks(chunks, reduction_tasks);
  const cpu::Store store = input_gradient_store<T>(chunks, dz != nullptr);
  GradSums sums(chunks.size() * C);
  // Planes not fused: a slice's sums per task; rows and blocks: a task's sums per channel.
  GradSums partial(planes ? tasks.size() : tasks.size() * C);
  const Tiled<T, acc_t> lanes(chunks, mean.data()), scale(chunks, z.scale.data()), bias(chunks, z.bias.data());
  tasks.run([&](size_t i, int64_t task, int64_t slot) {
    const Chunk& chunk = chunks[i];
    const Plan& p = chunk.plan;
    const int64_t offset = chunk.offset, row = i * C;
    T* dz_c = dz != nullptr ? dz + offset : nullptr;
    if (p.planes) {
      const PlaneSlice s = plane_slice(chunk, task);
      const int64_t j = row + s.c;
      const bool fused = p.fused();
      k.plane_grad_sums(dy + offset, x + offset, dz_c, chunk.g, s.c, s.lo, s.hi, mean[j], z.scale[j], z.bias[j], param,
                        fused ? &sums.dy[j] : &partial.dy[slot], fused ? &sums.dy_xmu[j] : &partial.dy_xmu[slot]);
      if (fused && dx)
        input_kernels.plane_grad_input(grad_in + offset, x + offset, dx + offset, chunk.g, s.c, 0,
                                       chunk.g.per_channel(), coeffs(i, s.c, sums), param, store);
    } else if (p.reductions_by_rows) {
      const auto [lo, hi] = row_task_range(chunk.g, p, task);
      k.rows_grad_sums(dy + offset, x + offset, dz_c, chunk.g, lo, hi, mean.data() + row, z.scale.data() + row,
                       z.bias.data() + row, param, partial.dy.data() + slot * C, partial.dy_xmu.data() + slot * C);
    } else {
      const BlockRange r = block_range(p, task);
      k.blocks_grad_sums(dy + offset, x + offset, dz_c, p.blocks[r.block], r.lo, r.hi, lanes(i, r.block),
                         scale(i, r.block), bias(i, r.block), param, partial.dy.data() + slot * C,
                         partial.dy_xmu.data() + slot * C);
    }
  });
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Plan& p = chunks[i].plan;
    if (p.fused()) continue;
    for (int64_t slot = tasks.first(i); slot < tasks.first(i + 1); ++slot) {
      const int64_t task = slot - tasks.first(i);
      if (planes) {
        sums.dy[i * C + task / p.slices] += partial.dy[slot];
        sums.dy_xmu[i * C + task / p.slices] += partial.dy_xmu[slot];
      } else {
        for (int64_t c = 0; c < C; ++c) {
          sums.dy[i * C + c] += partial.dy[slot * C + c];
          sums.dy_xmu[i * C + c] += partial.dy_xmu[slot * C + c];
        }
      }
    }
  }
  if (dx) {
    ChannelVector<GradInputCoefficients<acc_t>> all(chunks.size() * C);
    for (size_t i = 0; i < chunks.size(); ++i)
      for (int64_t c = 0; c < C; ++c) all[i * C + c] = coeffs(i, c, sums);
    grad_input_all(grad_in, x, dx, chunks, all, input_activation, /*after_reduction=*/true);
  }
  return sums;
}

}  // namespace cpu_passes
}  // namespace safebn
