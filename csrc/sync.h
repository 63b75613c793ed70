// What csrc/sync.cpp, SafeSyncBatchNorm's ops, offers the rest of the
// extension.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace safebn {

// The group statistics (mean, invstd, group_batch) of the latest eager
// sync_batch_norm call of module `module` (its id in this process) over the
// group `group_name`, which a recomputation under activation checkpointing
// normalizes with; none before its first.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> latest_group_statistics(c10::string_view group_name,
                                                                                     int64_t module);

}  // namespace safebn
