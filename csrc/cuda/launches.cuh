// The launches of the CUDA kernels: the vectorized or scalar form, the
// arrival counters and partial totals a reduction needs, the activation's
// fused form; their shapes come from launch.cuh. Included by batch_norm_cuda.cu alone.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../activation.h"
#include "../geometry.h"
#include "kernels.cuh"

namespace safebn {
namespace cuda {

// Whether the tensors can be read and written in 16-byte Packs: the runs the
// kernels walk (S values per (n, c), or the C channels of a row) hold whole
// Packs and every pointer is 16-byte aligned (a sliced view may not be).
inline bool packable(const Geometry& g, int pack_width, std::initializer_list<const void*> data) {
  const int64_t run = g.channels_last ? g.channels : g.spatial;
  if (run % pack_width != 0) return false;
  for (const void* p : data)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kPackBytes != 0) return false;
  return true;
}

// Where a reduction's blocks leave their partial totals when each channel is
// split over `splits` blocks; undefined with one split, when every block
// finishes its channels itself. The caching allocator keeps the memory valid
// for the kernels queued on this stream after it is freed.
template <typename State>
at::Tensor partials_for(int64_t splits, int64_t channels, const at::TensorOptions& options) {
  return splits > 1 ? at::empty({splits * channels * int64_t(sizeof(State))}, options.dtype(at::kByte)) : at::Tensor();
}

template <typename State>
State* partials_data(const at::Tensor& partials) {
  return partials.defined() ? static_cast<State*>(partials.mutable_data_ptr()) : nullptr;
}

// The arrival counters of a reduction over `tiles` tiles (kernels.cuh,
// GridCounters), zero before a launch, whose last arrivals reset them.
// Eager launches on one stream run one after another, so one set per device
// and stream serves them all, zeroed when made or grown, not per call. A
// launch being captured into a CUDA graph gets a set of its own from the
// graph's memory pool, zeroed by a node of the graph before it: graphs
// replay on any stream, concurrently with each other and with eager work,
// and a set shared with them would race (or start unzeroed). The lease owns
// the memory until the launch is queued: another host thread on the same
// stream (autograd's, say) may grow the set meanwhile.
struct CounterLease {
  at::Tensor memory;  // tiles arrival counters, then the tiles-done counter
  int64_t tiles;

  GridCounters counters() const {
    auto* data = static_cast<unsigned int*>(memory.mutable_data_ptr());
    return {data, data + tiles};
  }
};

inline CounterLease grid_counters(int64_t tiles, cudaStream_t stream) {
  const c10::DeviceIndex device = c10::cuda::current_device();
  const at::TensorOptions options = at::TensorOptions(at::kInt).device(at::kCUDA, device);
  if (c10::cuda::captureStatusMayInitCtx(stream) != c10::cuda::CaptureStatus::None)
    return {at::zeros({tiles + 1}, options), tiles};
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, cudaStream_t>, CounterLease> by_stream;
  const std::lock_guard<std::mutex> lock(mutex);
  CounterLease& set = by_stream.try_emplace({device, stream}, CounterLease{at::Tensor(), 0}).first->second;
  if (set.tiles < tiles) {
    set.tiles = std::max<int64_t>({tiles, 2 * set.tiles, 1024});
    set.memory = at::zeros({set.tiles + 1}, options);
  }
  return set;
}

template <typename Op, typename scalar_t, int V>
void launch_reduce(const Op& op, const Geometry& g, const scalar_t* in0, const scalar_t* in1,
                   const at::TensorOptions& options) {
  using State = typename Op::State;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    const auto kernel = rows_reduce_kernel<Op, scalar_t, V>;
    const RowsLaunch l = rows_launch(g, V, resident_blocks(kernel));
    const at::Tensor partials = partials_for<State>(l.grid.y, g.channels, options);
    const CounterLease lease = grid_counters(l.grid.x, stream);
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, l.shape, partials_data<State>(partials), lease.counters());
  } else {
    const auto kernel = plane_reduce_kernel<Op, scalar_t, V>;
    const PlaneLaunch l = plane_launch(g, V, resident_blocks(kernel));
    const at::Tensor partials = partials_for<State>(l.grid.y, g.channels, options);
    const CounterLease lease = grid_counters(l.grid.x, stream);
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, l.shape, partials_data<State>(partials), lease.counters());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op, typename scalar_t, int V>
void launch_map(const Op& op, const Geometry& g, const scalar_t* in0, const scalar_t* in1, scalar_t* out) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    const auto kernel = rows_map_kernel<Op, scalar_t, V>;
    const RowsLaunch l = rows_launch(g, V, resident_blocks(kernel));
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, out, l.shape);
  } else {
    const auto kernel = plane_map_kernel<Op, scalar_t, V>;
    const PlaneLaunch l = plane_launch(g, V, resident_blocks(kernel));
    kernel<<<l.grid, l.block, 0, stream>>>(op, in0, in1, out, l.shape);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(std::true_type{}) for an activation to fuse, fn(std::false_type{})
// for none: the kFused parameter of the elementwise ops (kernels.cuh).
template <typename Fn>
void with_fusion(const ActivationArg& activation, Fn fn) {
  if (activation.kind == Activation::kIdentity)
    fn(std::false_type{});
  else
    fn(std::true_type{});
}

// Per-channel reduction of `in0` (and `in1` for two-input ops) into op.finish.
// The input must be non-empty and in a kernel layout.
template <typename Op, typename scalar_t>
void reduce_channels(const Op& op, const at::Tensor& input, const Geometry& g, const scalar_t* in0,
                     const scalar_t* in1) {
  constexpr int V = kPackBytes / sizeof(scalar_t);
  if (packable(g, V, {in0, in1}))
    launch_reduce<Op, scalar_t, V>(op, g, in0, in1, input.options());
  else
    launch_reduce<Op, scalar_t, 1>(op, g, in0, in1, input.options());
}

// out = op.apply(channel constants, in0[, in1]) elementwise, out laid out as the input.
template <typename Op, typename scalar_t>
void map_channels(const Op& op, const Geometry& g, const scalar_t* in0, const scalar_t* in1, scalar_t* out) {
  constexpr int V = kPackBytes / sizeof(scalar_t);
  if (packable(g, V, {in0, in1, out}))
    launch_map<Op, scalar_t, V>(op, g, in0, in1, out);
  else
    launch_map<Op, scalar_t, 1>(op, g, in0, in1, out);
}

}  // namespace cuda
}  // namespace safebn
