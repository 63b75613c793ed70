// Launch configuration of every safebn CUDA kernel, decided here and nowhere
// else: block shapes, how a channel's values are split over blocks, and the
// shapes the kernels read their indexing from.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "../geometry.h"

namespace safebn {
namespace cuda {

// Threads per block of every kernel; the reductions rely on it being a power
// of two and a multiple of the warp size.
constexpr int kBlockThreads = 256;
static_assert(kBlockThreads % 32 == 0 && (kBlockThreads & (kBlockThreads - 1)) == 0,
              "kBlockThreads must be a power of two of whole warps");

// Width of one vectorized access: a Pack of 16 / sizeof(scalar_t) values.
constexpr int kPackBytes = 16;

// Packs each thread loads before it uses the first: enough bytes in flight to
// cover memory latency at moderate occupancy.
constexpr int kUnroll = 4;

constexpr int64_t kMaxGridY = 65535;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A contiguous (N, C, S) input as the kernels index it, in Packs of V values:
// channel c's values are N runs of `run` packs, run n starting at pack
// (n * channels + c) * run. A block covers `block_rows` runs of one channel,
// or `block_width` packs of one run when runs are split across blocks.
struct PlaneShape {
  int64_t channels;
  int64_t run;           // packs per (n, c): S / V
  int64_t batch;         // N
  int64_t block_rows;    // runs per block
  int64_t block_width;   // packs of a run per block
  int64_t width_splits;  // blocks across one run
};

// A channels-last input (and [N, C]) as the kernels index it: `rows` rows of
// `columns` packs of V consecutive channels.
struct RowsShape {
  int64_t rows;      // N * S
  int64_t columns;   // C / V
  int64_t channels;  // C
};

struct PlaneLaunch {
  dim3 grid, block;
  PlaneShape shape;
};

struct RowsLaunch {
  dim3 grid, block;
  RowsShape shape;
};

// Blocks of `kernel` resident on the whole GPU at once: the size of one wave.
// Asked of the driver once per device and kernel, since the query costs
// microseconds of host time, as much as a small batch's kernels.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, const void*>, int64_t> known;
  const std::pair<c10::DeviceIndex, const void*> key{c10::cuda::current_device(), reinterpret_cast<const void*>(kernel)};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, kBlockThreads, 0));
  const int64_t blocks =
      int64_t(std::max(per_multiprocessor, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  known.emplace(key, blocks);
  return blocks;
}

// Contiguous layouts: grid (C, splits), one block per rectangle of a
// channel's runs. One block per channel starves the GPU when C is small
// ([20, 6, 256, 256] would run 6 blocks), so each channel is split until the
// grid is one full wave, as long as every thread keeps at least kUnroll packs
// of work: into groups of whole runs while there are enough runs, else into
// single runs cut across their width (N = 1 images). The split count is
// rounded down: a second, mostly idle wave costs more than a few idle
// multiprocessors.
inline PlaneLaunch plane_launch(const Geometry& g, int pack_width, int64_t resident) {
  const int64_t run = g.spatial / pack_width;
  const int64_t max_splits = std::min(ceil_div(g.batch * run, int64_t(kBlockThreads) * kUnroll), kMaxGridY);
  const int64_t splits = std::clamp<int64_t>(resident / g.channels, 1, max_splits);
  int64_t block_rows = ceil_div(g.batch, splits), width_splits = 1;
  if (splits > g.batch) {
    block_rows = 1;
    width_splits = splits / g.batch;
  }
  const int64_t block_width = ceil_div(run, width_splits);
  width_splits = ceil_div(run, block_width);  // no empty block
  const int64_t row_splits = ceil_div(g.batch, block_rows);
  return {dim3(unsigned(g.channels), unsigned(row_splits * width_splits)), dim3(kBlockThreads),
          {g.channels, run, g.batch, block_rows, block_width, width_splits}};
}

// Channels-last layouts: threads along x cover consecutive packs of a row, so
// that a warp reads whole rows' contiguous bytes (up to 32 packs, 512 bytes);
// threads along y and grid.y cover rows, as many row splits as one wave
// allows, again with at least kUnroll rows per thread. grid.x covers the
// columns (C / V packs) in tiles of blockDim.x.
inline RowsLaunch rows_launch(const Geometry& g, int pack_width, int64_t resident) {
  const int64_t columns = g.channels / pack_width, rows = g.rows();
  int block_x = 1;
  while (block_x < 32 && block_x < columns) block_x *= 2;
  const int block_y = kBlockThreads / block_x;  // a power of two: the row reduction halves it
  const int64_t tiles = ceil_div(columns, block_x);
  const int64_t max_splits = std::min(ceil_div(rows, int64_t(block_y) * kUnroll), kMaxGridY);
  const int64_t splits = std::clamp<int64_t>(resident / tiles, 1, max_splits);
  return {dim3(unsigned(tiles), unsigned(splits)), dim3(block_x, block_y), {rows, columns, g.channels}};
}


}  // namespace cuda
}  // namespace safebn
