// Layouts and allocations every device's implementation shares (layout.h).
#include "layout.h"

#include <ATen/ops/empty.h>

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
  const at::MemoryFormat format = *kernel_memory_format(like);
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

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor channel_stat_tensor(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(accumulate_type(input.scalar_type())));
}

at::Tensor undefined_channel_stats(const at::Tensor& input) { return channel_stat_tensor(input).fill_(NAN); }

}  // namespace safebn
