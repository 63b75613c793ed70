// How an op's tensors are laid out for the kernels and what they allocate:
// the layouts the kernels walk, the geometry they read, the dtype and shape
// of the per-channel statistics.
#pragma once

#include <ATen/core/Tensor.h>

#include "geometry.h"

namespace safebn {

// The input in a layout the kernels walk directly: contiguous, channels_last
// or channels_last_3d are returned as they are; any other strides are copied
// to contiguous (the one case where the activation is copied).
at::Tensor with_kernel_layout(const at::Tensor& input);

// `t` (a gradient) laid out as the kernels walk `like`: exactly like it where
// it has a kernel layout, else contiguous (with_kernel_layout's copy).
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like);

Geometry geometry_of(const at::Tensor& input_with_kernel_layout);

// The values a channel's statistics are computed over: N times the spatial
// size (0 without channels).
int64_t values_per_channel(const at::Tensor& input);

// Ghost batch norm (virtual_batch_size > 0): a training batch is normalized
// in chunks of at most virtual_batch_size examples, each with its own
// statistics, as consecutive slices along N (contiguous in every kernel
// layout). chunk_count is 1 without chunks (virtual_batch_size 0), and
// chunk_of() the whole tensor.
int64_t chunk_count(int64_t batch, int64_t virtual_batch_size);
at::Tensor chunk_of(const at::Tensor& t, int64_t index, int64_t virtual_batch_size);

// float32 for float/half/bfloat16 input, float64 for float64 input
// (torch_safebn/contract.py's accumulate_dtype).
at::ScalarType accumulate_type(at::ScalarType input_type);

// An uninitialized per-channel statistic (mean, invstd, ...) for `input`, in
// the accumulation dtype on its device: [C], or [chunks, C] for a ghost batch norm.
at::Tensor channel_stat_tensor(const at::Tensor& input, int64_t virtual_batch_size = 0);

// The statistics of an input with no values, on every device: undefined, NaN
// in every channel.
at::Tensor undefined_channel_stats(const at::Tensor& input, int64_t virtual_batch_size = 0);

}  // namespace safebn
