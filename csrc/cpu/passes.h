// The passes of the CPU ops over a batch-norm input: how each is split into
// tasks (Plan) and walked with the kernels of kernels.h, the reductions fused
// with their elementwise pass where a channel stays in cache. Included by
// batch_norm_cpu.cpp alone.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>

#include "../activation.h"
#include "../geometry.h"
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

// fn(task, c, lo, hi) for every slice of every channel's plane.
template <typename Fn>
void for_each_slice(const Geometry& g, const Plan& p, Fn fn) {
  at::parallel_for(0, g.channels * p.slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / p.slices, lo = (task % p.slices) * p.slice_len;
      fn(task, c, lo, std::min(lo + p.slice_len, g.per_channel()));
    }
  });
}

// fn(task, part, lo, hi) for every row range of p.blocks[part], the leftover
// rows (part 1) last.
template <typename Fn>
void for_each_row_range(const Plan& p, Fn fn) {
  const int64_t rows = at::divup(p.blocks[0].rows, p.tasks);
  at::parallel_for(0, p.tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      fn(task, 0, task * rows, std::min((task + 1) * rows, p.blocks[0].rows));
  });
  if (p.blocks[1].rows > 0) fn(p.tasks, 1, int64_t(0), p.blocks[1].rows);
}

int64_t row_range_count(const Plan& p) { return p.reductions_by_rows ? p.row_tasks : p.tasks + 1; }

// fn(task, lo, hi) for p.row_tasks ranges of the (n, c) rows of a contiguous
// input, in memory order.
template <typename Fn>
void for_each_row_task(const Geometry& g, const Plan& p, Fn fn) {
  const int64_t rows = g.batch * g.channels, per_task = at::divup(rows, p.row_tasks);
  at::parallel_for(0, p.row_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) fn(task, task * per_task, std::min(rows, (task + 1) * per_task));
  });
}

// A per-channel array repeated over the lanes of a row of each of p.blocks,
// in the order the kernels for T read them (cpu::lane_order).
template <typename T, typename acc_t>
class Tiled {
 public:
  Tiled(const Plan& p, const acc_t* per_channel) {
    for (size_t part = 0; part < p.blocks.size(); ++part) {
      const cpu::Blocks& b = p.blocks[part];
      const cpu::LaneOrder order = cpu::lane_order<T>(b);
      lanes_[part].resize(b.width);
      b.for_each_channel_span(0, b.width, [&](int64_t first, int64_t last, int64_t c) {
        for (int64_t j = first; j < last; ++j) lanes_[part][order.index(j)] = per_channel[c];
      });
    }
  }
  const acc_t* operator[](int part) const { return lanes_[part].data(); }

 private:
  std::array<ChannelVector<acc_t>, 2> lanes_;
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
void normalize_all(const T* x, T* y, const Geometry& g, const Plan& p, const NormalizeParams<acc_t>& k) {
  const auto& kern = cpu::kernels<T>(k.activation.kind);
  if (p.elementwise_by_rows) {
    for_each_row_task(g, p, [&](int64_t, int64_t lo, int64_t hi) {
      kern.rows_normalize(x, y, g, lo, hi, k.mean.data(), k.scale.data(), k.bias.data(), k.param());
    });
    return;
  }
  const Tiled<T, acc_t> mean(p, k.mean.data()), scale(p, k.scale.data()), bias(p, k.bias.data());
  for_each_row_range(p, [&](int64_t, int part, int64_t lo, int64_t hi) {
    kern.blocks_normalize(x, y, p.blocks[part], lo, hi, mean[part], scale[part], bias[part], k.param());
  });
}

// Reduces every channel to its Welford statistics and hands each to
// `finish(c, stats)`, which fills `params` for the normalization that
// follows when `y` is given. Fused per channel where the plan allows.
template <typename T, typename acc_t, typename Finish>
void reduce_channels(const T* x, T* y, const Geometry& g, NormalizeParams<acc_t>& params, Finish finish) {
  const auto& k = cpu::kernels<T>(params.activation.kind);
  const int64_t C = g.channels;
  const Plan p = plan_for(g);
  if (p.fused()) {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        finish(c, k.plane_stats(x, g, c, 0, g.per_channel()));
        if (y)
          k.plane_normalize(x, y, g, c, 0, g.per_channel(), params.mean[c], params.scale[c], params.bias[c],
                            params.param());
      }
    });
    return;
  }
  if (p.planes) {
    ChannelVector<Welford<acc_t>> partial(C * p.slices);
    for_each_slice(g, p, [&](int64_t task, int64_t c, int64_t lo, int64_t hi) {
      partial[task] = k.plane_stats(x, g, c, lo, hi);
    });
    for (int64_t c = 0; c < C; ++c) {
      Welford<acc_t> total;
      for (int64_t s = 0; s < p.slices; ++s) total.merge(partial[c * p.slices + s]);
      finish(c, total);
    }
  } else {
    // Each channel's sums are taken relative to its first value.
    ChannelVector<acc_t> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = cpu::load(x[g.channels_last ? c : c * g.spatial]);
    ChannelVector<cpu::ShiftedSums> partial(row_range_count(p) * C);
    if (p.reductions_by_rows) {
      for_each_row_task(g, p, [&](int64_t task, int64_t lo, int64_t hi) {
        k.rows_stats(x, g, lo, hi, shift.data(), partial.data() + task * C);
      });
    } else {
      const Tiled<T, acc_t> lanes(p, shift.data());
      for_each_row_range(p, [&](int64_t task, int part, int64_t lo, int64_t hi) {
        k.blocks_stats(x, p.blocks[part], lo, hi, lanes[part], partial.data() + task * C);
      });
    }
    for (int64_t c = 0; c < C; ++c) {
      Welford<acc_t> total;
      for (int64_t t = 0; t < row_range_count(p); ++t) total.merge(partial[t * C + c].welford(shift[c]));
      finish(c, total);
    }
  }
  if (y) normalize_all(x, y, g, p, params);
}

// sum(dy) and sum(dy * (x - mean)) per channel, in double.
struct GradSums {
  ChannelVector<double> dy, dy_xmu;
  explicit GradSums(int64_t channels) : dy(channels, 0.0), dy_xmu(channels, 0.0) {}
};

template <typename T, typename acc_t>
void grad_input_all(const T* dy, const T* x, T* dx, const Geometry& g, const Plan& p,
                    const ChannelVector<GradInputCoefficients<acc_t>>& k, ActivationArg activation) {
  const auto& kern = cpu::kernels<T>(activation.kind);
  const acc_t param = acc_t(activation.param);
  if (p.elementwise_by_rows) {
    for_each_row_task(g, p, [&](int64_t, int64_t lo, int64_t hi) {
      kern.rows_grad_input(dy, x, dx, g, lo, hi, k.data(), param);
    });
    return;
  }
  ChannelVector<acc_t> fields[5];
  for (auto& f : fields) f.resize(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) {
    fields[0][c] = k[c].mean;
    fields[1][c] = k[c].scale;
    fields[2][c] = k[c].shift;
    fields[3][c] = k[c].mean_dy;
    fields[4][c] = k[c].proj;
  }
  const Tiled<T, acc_t> mean(p, fields[0].data()), scale(p, fields[1].data()), shift(p, fields[2].data()),
      mean_dy(p, fields[3].data()), proj(p, fields[4].data());
  for_each_row_range(p, [&](int64_t, int part, int64_t lo, int64_t hi) {
    const cpu::GradInputLanes<acc_t> lanes{mean[part], scale[part], shift[part], mean_dy[part], proj[part]};
    kern.blocks_grad_input(dy, x, dx, p.blocks[part], lo, hi, lanes, param);
  });
}

// The two sums, of dz = dy * act'(z) with z the forward's output before its
// activation (`z`: the forward's constants), and, when `dx` is given, the
// input gradient from the coefficients `coeffs(c, sums)` returns; fused per
// channel as above. Where cpu::stores_activation_grad, dz is written to dx by
// the reduction and the input gradient is the identity's, from dz in place.
template <typename T, typename acc_t, typename Coefficients>
GradSums reduce_grads(const T* dy, const T* x, T* dx, const Geometry& g, const NormalizeParams<acc_t>& z,
                      Coefficients coeffs) {
  const auto& k = cpu::kernels<T>(z.activation.kind);
  const ChannelVector<acc_t>& mean = z.mean;
  const acc_t param = z.param();
  const int64_t C = g.channels;
  const Plan p = plan_for(g);
  T* dz = dx != nullptr && cpu::stores_activation_grad(z.activation.kind) ? dx : nullptr;
  // What the input gradient reads as its incoming gradient, and through which activation.
  const T* grad_in = dz != nullptr ? dz : dy;
  const ActivationArg input_activation = dz != nullptr ? ActivationArg{} : z.activation;
  GradSums sums(C);
  if (p.fused()) {
    const auto& input_kernels = cpu::kernels<T>(input_activation.kind);
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        k.plane_grad_sums(dy, x, dz, g, c, 0, g.per_channel(), mean[c], z.scale[c], z.bias[c], param, &sums.dy[c],
                          &sums.dy_xmu[c]);
        if (dx) input_kernels.plane_grad_input(grad_in, x, dx, g, c, 0, g.per_channel(), coeffs(c, sums), param);
      }
    });
    return sums;
  }
  const int64_t partials = p.planes ? C * p.slices : row_range_count(p) * C;
  GradSums partial(partials);
  if (p.planes) {
    for_each_slice(g, p, [&](int64_t task, int64_t c, int64_t lo, int64_t hi) {
      k.plane_grad_sums(dy, x, dz, g, c, lo, hi, mean[c], z.scale[c], z.bias[c], param, &partial.dy[task],
                        &partial.dy_xmu[task]);
    });
    for (int64_t task = 0; task < partials; ++task) {
      sums.dy[task / p.slices] += partial.dy[task];
      sums.dy_xmu[task / p.slices] += partial.dy_xmu[task];
    }
  } else {
    if (p.reductions_by_rows) {
      for_each_row_task(g, p, [&](int64_t task, int64_t lo, int64_t hi) {
        k.rows_grad_sums(dy, x, dz, g, lo, hi, mean.data(), z.scale.data(), z.bias.data(), param,
                         partial.dy.data() + task * C, partial.dy_xmu.data() + task * C);
      });
    } else {
      const Tiled<T, acc_t> lanes(p, mean.data()), scale(p, z.scale.data()), bias(p, z.bias.data());
      for_each_row_range(p, [&](int64_t task, int part, int64_t lo, int64_t hi) {
        k.blocks_grad_sums(dy, x, dz, p.blocks[part], lo, hi, lanes[part], scale[part], bias[part], param,
                           partial.dy.data() + task * C, partial.dy_xmu.data() + task * C);
      });
    }
    for (int64_t i = 0; i < partials; ++i) {
      sums.dy[i % C] += partial.dy[i];
      sums.dy_xmu[i % C] += partial.dy_xmu[i];
    }
  }
  if (dx) {
    ChannelVector<GradInputCoefficients<acc_t>> all(C);
    for (int64_t c = 0; c < C; ++c) all[c] = coeffs(c, sums);
    grad_input_all(grad_in, x, dx, g, p, all, input_activation);
  }
  return sums;
}

}  // namespace cpu_passes
}  // namespace safebn
