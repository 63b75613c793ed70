// A process group's batch as SafeSyncBatchNorm's ops pass it on (csrc/sync.cpp):
// group_batch, int64 on the CPU, per rank of the group its values per channel,
// its examples and whether its statistics were finite. Read by the ops and by
// the autograd kernels, which keep a degenerate batch's running statistics,
// and by the host's bookkeeping (torch_safebn._C.group_totals).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace safebn {

// The group's batch: values per channel and examples over every rank, and
// whether every rank with values had finite statistics.
struct GroupTotals {
  int64_t count = 0, examples = 0;
  bool finite = true;

  // One value per channel over the group: 0/0 variance.
  bool degenerate() const { return count == 1; }
};

inline GroupTotals totals(const at::Tensor& group_batch) {
  TORCH_CHECK(group_batch.is_cpu() && group_batch.scalar_type() == at::kLong && group_batch.dim() == 2 &&
                  group_batch.size(1) == 3,
              "group_batch must be the int64 CPU tensor [group size, 3] that sync_batch_norm_train returned, got ",
              group_batch.scalar_type(), " ", group_batch.sizes(), " on ", group_batch.device());
  GroupTotals t;
  const auto rows = group_batch.accessor<int64_t, 2>();
  for (int64_t rank = 0; rank < rows.size(0); ++rank) {
    t.count += rows[rank][0];
    t.examples += rows[rank][1];
    t.finite = t.finite && (rows[rank][0] == 0 || rows[rank][2] != 0);
  }
  return t;
}

}  // namespace safebn
