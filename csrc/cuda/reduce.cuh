// The building blocks of the CUDA kernels (kernels.cuh): 16-byte memory
// access, reductions inside a warp and a block, and the grid-wide completion
// by which a reduction's last block finishes it in the same launch.
#pragma once

#include <cstdint>
#include <cstring>

#include "../guard.h"
#include "../welford.h"

namespace safebn {
namespace cuda {

// ---- memory access ---------------------------------------------------------

// V consecutive values moved as one access: 16 bytes on the vectorized path,
// a single value on the scalar fallback (V = 1).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t value[V];
};

template <int V, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* __restrict__ data, int64_t pack) {
  return reinterpret_cast<const Pack<scalar_t, V>*>(data)[pack];
}

template <int V, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ data, int64_t pack, const Pack<scalar_t, V>& p) {
  reinterpret_cast<Pack<scalar_t, V>*>(data)[pack] = p;
}

// ---- reductions inside a block ---------------------------------------------

// sum(dy) and sum(dy * (x - mean)) of a channel.
template <typename acc_t>
struct GradSums {
  acc_t dy = 0;
  acc_t dy_xmu = 0;
};

// How two partial states become one. Welford states merge with Chan's
// formula: never by adding means.
template <typename acc_t>
__device__ __forceinline__ void combine(Welford<acc_t>& a, const Welford<acc_t>& b) {
  a.merge(b);
}
template <typename acc_t>
__device__ __forceinline__ void combine(GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  a.dy += b.dy;
  a.dy_xmu += b.dy_xmu;
}
__device__ __forceinline__ void combine(ChannelFaults& a, const ChannelFaults& b) { a.add(b); }

// Any state, shuffled down the warp 32 bits at a time.
template <typename State>
__device__ __forceinline__ State shuffle_down(const State& state, unsigned int delta) {
  static_assert(sizeof(State) % sizeof(int) == 0, "shuffled in 32-bit words");
  constexpr int kWords = sizeof(State) / sizeof(int);
  int words[kWords];
  memcpy(words, &state, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_down_sync(0xffffffffu, words[i], delta);
  State out;
  memcpy(&out, words, sizeof(State));
  return out;
}

// The combined state of a warp, in lane 0 (the other lanes hold partial
// combinations). Every lane of the warp must take part.
template <typename State>
__device__ __forceinline__ State warp_reduce(State state) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) combine(state, shuffle_down(state, offset));
  return state;
}

// The combined state of a block of whole warps, returned to every thread:
// warps reduce by shuffles, then the first warp reduces the warps' totals.
// Threads count x fastest, as the hardware forms warps.
template <typename State>
__device__ State block_reduce(State state) {
  // Raw storage: a __shared__ array may not have constructors to run.
  __shared__ alignas(State) unsigned char storage[32 * sizeof(State)];
  State* warp_totals = reinterpret_cast<State*>(storage);
  const int thread = threadIdx.y * blockDim.x + threadIdx.x, lane = thread % 32, warp = thread / 32;
  state = warp_reduce(state);
  if (lane == 0) warp_totals[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = warp_reduce(lane < int(blockDim.x * blockDim.y / 32) ? warp_totals[lane] : State());
    if (lane == 0) warp_totals[0] = state;
  }
  __syncthreads();
  const State total = warp_totals[0];
  __syncthreads();  // the storage is free again for the next call
  return total;
}

// Combines each thread's V states with those of the other rows of its block
// (threadIdx.y; blockDim.y a power of two) by halving in shared memory;
// afterwards the threads of row 0 hold the block's totals. `shared` holds
// blockDim.x * blockDim.y * V states.
template <typename State, int V>
__device__ void reduce_block_rows(State (&state)[V], State* shared) {
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * V;
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y >= half && threadIdx.y < 2 * half) {
#pragma unroll
      for (int v = 0; v < V; ++v) shared[slot + v] = state[v];
    }
    __syncthreads();
    if (threadIdx.y < half) {
#pragma unroll
      for (int v = 0; v < V; ++v) combine(state[v], shared[slot + half * blockDim.x * V + v]);
    }
    __syncthreads();
  }
}

// Channel c's first value, element (0, c, 0), which reduction ops take as a
// shift near the channel's data. `stride` is S for contiguous layouts and 1
// for channels-last ones.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t first_value(const scalar_t* x, int64_t c, int64_t stride) {
  return acc_t(x[c * stride]);
}

// ---- grid-wide completion ---------------------------------------------------
// A reduction splits each tile of channels (blockIdx.x: one channel, or one
// group of channel columns) over gridDim.y blocks. Each stores its partial
// totals; the last of a tile's blocks to arrive merges and finishes the
// tile's channels, and the last tile to finish runs the op's grid epilogue.
// No second launch, no host round trip. The arrival counters are zero
// between launches (the last arrival resets each), so they are cleared once
// per device and stream, not per call (launch.cuh).

struct GridCounters {
  unsigned int* tile_arrivals;  // gridDim.x counters
  unsigned int* tiles_done;     // one counter
};

// A partial total that another block stored before it arrived, read at L2
// (ld.global.cg) past this multiprocessor's L1: arrive_last's fences order
// the store before the read, and a load that cannot hit a stale L1 line
// says so in the code rather than leaving it to what the compiler emits.
template <typename State>
__device__ __forceinline__ State load_partial(const State* partial) {
  static_assert(sizeof(State) % sizeof(unsigned int) == 0, "loaded in 32-bit words");
  constexpr int kWords = sizeof(State) / sizeof(unsigned int);
  unsigned int words[kWords];
  const unsigned int* source = reinterpret_cast<const unsigned int*>(partial);
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __ldcg(source + i);
  State state;
  memcpy(&state, words, sizeof(State));
  return state;
}

// True, in every thread of the block, for the block that arrives last of
// `expected` at `counter`; every global write the other blocks made before
// they arrived is then visible to it. Every thread of the block must call it.
__device__ bool arrive_last(unsigned int* counter, unsigned int expected) {
  __shared__ bool last;
  __threadfence();  // release: this thread's writes, before its block's arrival
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(counter, 1u) == expected - 1;
    if (last) atomicExch(counter, 0u);  // ready for the next launch on this stream
  }
  __syncthreads();
  if (last) __threadfence();  // acquire: the other blocks' writes
  return last;
}

}  // namespace cuda
}  // namespace safebn
