// Layouts and allocations every device's implementation shares (layout.h).
#include "layout.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace safebn {

namespace {

std::optional<at::MemoryFormat> kernel_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return std::nullopt;
}

}  // namespace

at::Tensor with_kernel_layout(const at::Tensor& input) {
  return kernel_memory_format(input).has_value() ? input : input.contiguous();
}

at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  const at::MemoryFormat format = kernel_memory_format(like).value_or(at::MemoryFormat::Contiguous);
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

Geometry geometry_of(const at::Tensor& input) {
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.spatial *= input.size(d);
  // [N, C] is walked as rows of C channels, the better vectorized of the two.
  g.channels_last = input.dim() == 2 || *kernel_memory_format(input) != at::MemoryFormat::Contiguous;
  return g;
}

int64_t values_per_channel(const at::Tensor& input) {
  return input.size(1) > 0 ? input.numel() / input.size(1) : 0;
}

int64_t chunk_count(int64_t batch, int64_t virtual_batch_size) {
  return virtual_batch_size > 0 ? std::max<int64_t>(1, (batch + virtual_batch_size - 1) / virtual_batch_size) : 1;
}

at::Tensor chunk_of(const at::Tensor& t, int64_t index, int64_t virtual_batch_size) {
  if (virtual_batch_size <= 0) return t;
  const int64_t start = index * virtual_batch_size;
  return t.narrow(0, start, std::min(virtual_batch_size, t.size(0) - start));
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor channel_stat_tensor(const at::Tensor& input, int64_t virtual_batch_size) {
  const at::TensorOptions options = input.options().dtype(accumulate_type(input.scalar_type()));
  if (virtual_batch_size <= 0) return at::empty({input.size(1)}, options);
  return at::empty({chunk_count(input.size(0), virtual_batch_size), input.size(1)}, options);
}

at::Tensor undefined_channel_stats(const at::Tensor& input, int64_t virtual_batch_size) {
  return channel_stat_tensor(input, virtual_batch_size).fill_(NAN);
}

}  // namespace safebn
