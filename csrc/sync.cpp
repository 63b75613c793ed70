// Batch norm with the statistics of a process group (SafeSyncBatchNorm), for
// every device at once (CompositeExplicitAutograd): each rank's statistics
// and the normalization are the device's ops, the collectives torch's
// functional ones (_c10d_functional), which torch.compile traces, and the
// guard the same guarded update as a local batch norm's, fed the group's
// statistics. Every decision is taken from the gathered values, which are the
// same on every rank, so that every rank takes the same one and none is left
// waiting in a collective the others skipped.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "group_batch.h"
#include "layout.h"
#include "sync.h"
#include "welford.h"

namespace safebn {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

// A host tensor `t` on `device`: copied without waiting (from pinned memory
// to a GPU), and no op at all where it is there already, as on the CPU.
Tensor on_device(const Tensor& t, c10::Device device) {
  return t.device() == device ? t : t.to(device, /*non_blocking=*/true);
}

// A host tensor, pinned where it is copied to a GPU: allocated directly, not
// through the dispatcher, as a forward makes several on the host's hot path.
Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype, bool pinned = false) {
  return at::detail::empty_cpu(sizes, dtype, pinned);
}

c10::OperatorHandle operator_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// The functional collectives take the group by name (their `Any` argument):
// called boxed.
Tensor wait(Tensor t) {
  static const auto op = operator_handle("_c10d_functional::wait_tensor").typed<Tensor(const Tensor&)>();
  return op.call(t);
}

std::string gather_failed() {
  return "the all_gather of the process group's batch statistics failed. Another rank may have failed, exited or "
         "timed out, or made other collectives: every rank must make the same synchronized forwards, in training "
         "mode, in the same order.";
}

// A failed gather is explained, in the class it came in: torch's errors
// (a DistBackendError, an OutOfMemoryError) keep theirs, the explanation
// added as context; a transport's std::runtime_error becomes a RuntimeError
// (which Python made of it anyway); anything else passes as it is.
Tensor all_gather(const Tensor& t, int64_t group_size, c10::string_view group_name) {
  static const c10::OperatorHandle op = operator_handle("_c10d_functional::all_gather_into_tensor");
  torch::jit::Stack stack{t, group_size, std::string(group_name)};
  try {
    op.callBoxed(stack);
    return wait(stack.back().toTensor());
  } catch (c10::Error& error) {
    error.add_context(gather_failed());
    throw;
  } catch (const std::runtime_error& error) {
    TORCH_CHECK(false, error.what(), "\n", gather_failed());
  }
}

// In place, and waited for: `t` is the caller's own, and the out-of-place
// collective would clone it.
void all_reduce_sum_(const Tensor& t, c10::string_view group_name) {
  static const c10::OperatorHandle op = operator_handle("_c10d_functional::all_reduce_");
  torch::jit::Stack stack{t, std::string("sum"), std::string(group_name)};
  op.callBoxed(stack);
  wait(stack.back().toTensor());
}

#define SAFEBN_TYPED_OP(function, name, ...)                                                 \
  const auto& function() {                                                                   \
    static const auto op = operator_handle(name).typed<__VA_ARGS__>();                       \
    return op;                                                                               \
  }

SAFEBN_TYPED_OP(sync_train_op, "safebn::sync_batch_norm_train",
                std::tuple<Tensor, Tensor, Tensor, Tensor>(
                    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, std::optional<double>, double,
                    c10::string_view, int64_t, int64_t, int64_t, bool, bool, int64_t, double))
SAFEBN_TYPED_OP(batch_stats_op, "safebn::batch_stats", std::tuple<Tensor, Tensor>(const Tensor&))
SAFEBN_TYPED_OP(normalize_op, "safebn::normalize",
                Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       int64_t, double))
SAFEBN_TYPED_OP(eval_op, "safebn::batch_norm_eval",
                Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       const OptionalTensor&, double, int64_t, double))
SAFEBN_TYPED_OP(update_op, "safebn::update_running_stats",
                void(const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                     const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, c10::SymInt, double,
                     std::optional<double>, bool))
SAFEBN_TYPED_OP(backward_op, "safebn::backward",
                Grads(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                      const Tensor&, bool, std::array<bool, 3>, int64_t, double, c10::SymInt))
SAFEBN_TYPED_OP(backward_reduce_op, "safebn::backward_reduce",
                Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                      const OptionalTensor&, std::array<bool, 2>, int64_t, double))
SAFEBN_TYPED_OP(backward_elemt_op, "safebn::backward_elemt",
                Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                       const Tensor&, c10::SymInt, const OptionalTensor&, int64_t, double))
#undef SAFEBN_TYPED_OP

// ---- the group's protocol ----------------------------------------------------
// Every rank must make the same synchronized forwards, module by module, in
// the same order. A rank that does not (one in eval mode or with frozen
// statistics, with another channel count, on another code path) must end in
// an error on every rank taking part, never in collectives that pair the rows
// of different forwards (wrong statistics) or rows of different sizes (gloo
// aborts the process). So a module registers with its group at its first
// synchronized forward: a fixed-size all_gather checks that every rank
// registers the same module (its ordinal in the group, its channels, its
// qualified name's hash) and agrees on the size every row is padded to, the
// largest of the group's modules so far; and every row carries a header (the
// module's ordinal, its forward count, its channels, its name's hash) that
// every rank checks after the gather.

using GroupStatistics = std::tuple<Tensor, Tensor, Tensor>;  // mean, invstd, group_batch

constexpr double kProtocol = 20261206;  // marks a row of this protocol
constexpr int64_t kHeader = 5;          // kProtocol, ordinal, forwards, channels, name
constexpr int64_t kStats = kHeader + 2;  // then count and examples; the statistics start here

struct GroupState {
  int64_t modules = 0;   // registered so far
  int64_t row_size = 0;  // every row's length, padding included
};

struct Registration {
  const GroupState* group = nullptr;  // its group's (a node of `groups`, which never moves)
  int64_t ordinal = 0;
  int64_t forwards = 0;
  std::optional<GroupStatistics> latest;  // its latest eager forward's (sync_batch_norm)
};

std::mutex protocol_mutex;
std::map<std::string, GroupState> groups;
// Leaked, as the statistics it keeps may be a GPU's: destroyed at exit, they
// would be freed after CUDA's own teardown.
auto& registrations = *new std::map<std::pair<std::string, int64_t>, Registration>();

std::string describe_rows(const Tensor& headers, const char* what) {
  std::ostringstream text;
  const auto rows = headers.accessor<double, 2>();
  for (int64_t rank = 0; rank < rows.size(0); ++rank) {
    text << (rank ? "; " : "") << "rank " << rank << " of the group: ";
    if (rows[rank][0] != kProtocol) {
      text << "another collective";
      continue;
    }
    text << "module #" << int64_t(rows[rank][1]) << " (name hash " << int64_t(rows[rank][4]) << "), " << what << " "
         << int64_t(rows[rank][2]) << ", " << int64_t(rows[rank][3]) << " channels";
  }
  return text.str();
}

constexpr const char* kSameForwards =
    ". Every rank must hold the same model and make the same synchronized forwards in the same order: the same "
    "train/eval mode and freeze_stats, the same number of channels, the same code path.";

// The module's registration with its group (registered at its first call).
Registration& registration(const Tensor& input, c10::string_view group_name, int64_t group_size, int64_t module,
                           int64_t name) {
  const std::string group(group_name);
  std::unique_lock<std::mutex> lock(protocol_mutex);
  auto found = registrations.find({group, module});
  if (found != registrations.end()) return found->second;
  GroupState& state = groups[group];
  const int64_t channels = input.size(1), needed = kStats + 2 * channels;
  lock.unlock();
  const Tensor mine =
      at::tensor({kProtocol, double(state.modules), 0.0, double(channels), double(name), double(needed)}, at::kDouble)
          .to(input.device());
  const Tensor all = all_gather(mine, group_size, group_name).view({group_size, kHeader + 1}).cpu();
  const Tensor headers = all.narrow(1, 0, kHeader);
  TORCH_CHECK(headers.eq(headers[0]).all().item<bool>(), "the ranks disagree at the first synchronized forward of "
              "this SafeSyncBatchNorm (", describe_rows(headers, "registration"), ")", kSameForwards);
  lock.lock();
  state.row_size = std::max(state.row_size, int64_t(all.select(1, kHeader).max().item<double>()));
  return registrations[{group, module}] = Registration{&state, state.modules++};
}

// This rank's row: the header, then [count, examples, mean (C), variance
// (C)], in float64 so that counts stay exact and the merge loses nothing,
// padded with zeros. An empty batch sends zero statistics, which its count
// of 0 weighs out of the merge (its own are NaN and would poison every rank).
// On the CPU the row is written in place; on a GPU the header travels
// through pinned memory, copied without waiting for the device (the caching
// host allocator keeps the buffer until the copy has read it), and one cat
// on the device assembles the row.
Tensor rank_row(const double (&header)[kStats], const std::optional<std::tuple<Tensor, Tensor>>& stats,
                int64_t row_size, const Tensor& input) {
  const int64_t stats_size = stats.has_value() ? 2 * input.size(1) : 0;
  if (input.is_cpu()) {
    const Tensor row = host_empty({row_size}, at::kDouble);
    double* const out = row.data_ptr<double>();
    std::copy(header, header + kStats, out);
    if (stats.has_value()) {
      const auto& [mean, var] = *stats;
      AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "safebn_rank_row", [&] {
        const int64_t channels = mean.numel();
        std::copy_n(mean.expect_contiguous()->data_ptr<scalar_t>(), channels, out + kStats);
        std::copy_n(var.expect_contiguous()->data_ptr<scalar_t>(), channels, out + kStats + channels);
      });
    }
    std::fill(out + kStats + stats_size, out + row_size, 0.0);
    return row;
  }
  const Tensor host = host_empty({kStats}, at::kDouble, input.is_cuda());
  std::copy(header, header + kStats, host.data_ptr<double>());
  std::vector<Tensor> parts{on_device(host, input.device())};
  if (stats.has_value()) parts.insert(parts.end(), {std::get<0>(*stats), std::get<1>(*stats)});
  const int64_t padding = row_size - kStats - stats_size;
  if (padding > 0) parts.push_back(at::zeros({padding}, input.options().dtype(at::kDouble)));
  return at::cat(parts);  // promotes the statistics to float64
}

// The statistics of the group's concatenated batch: this rank's row, one
// all_gather of every rank's, their merge.
GroupStatistics gather_statistics(const Tensor& input, double eps, c10::string_view group_name, int64_t group_size,
                                  int64_t module, int64_t name) {
  TORCH_CHECK_VALUE(group_size > 0, "group_size must be > 0, got ", group_size);
  const int64_t channels = input.size(1), count = values_per_channel(input);
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  Registration& me = registration(input, group_name, group_size, module, name);
  int64_t row_size;
  {
    const std::lock_guard<std::mutex> lock(protocol_mutex);
    row_size = me.group->row_size;
  }
  // Every row has the length the group agreed on when its modules registered:
  // a module called with more channels than that would not fit.
  TORCH_CHECK_VALUE(kStats + 2 * channels <= row_size, "this SafeSyncBatchNorm registered with its process group "
                    "at its first synchronized forward, whose rows hold at most ", (row_size - kStats) / 2,
                    " channels, and this call's input has ", channels, ": a synchronized batch norm keeps the "
                    "channel count of its first call; use one module per channel count.");
  const double header[kStats] = {kProtocol,    double(me.ordinal), double(me.forwards++),  double(channels),
                                 double(name), double(count),      double(input.size(0))};
  const Tensor row = count > 0 ? rank_row(header, batch_stats_op().call(input), row_size, input)
                               : rank_row(header, std::nullopt, row_size, input);
  // The forward's one host synchronization, as nn.SyncBatchNorm's: the ops
  // take the group's count as an integer, the host's messages name ranks, and
  // the headers are checked. The merge is a few values per channel and rank,
  // done on the host in the same pass rather than as a dozen tiny device ops.
  const Tensor gathered = all_gather(row, group_size, group_name);
  const Tensor rows = gathered.is_cpu() ? gathered : gathered.cpu();
  const int64_t sizes[2] = {group_size, row_size}, strides[2] = {row_size, 1};
  const at::TensorAccessor<double, 2> all(rows.data_ptr<double>(), sizes, strides);
  Tensor group_batch = host_empty({group_size, 3}, at::kLong);
  auto batch = group_batch.accessor<int64_t, 2>();
  // Chan's merge (welford.h): the statistics of the concatenated batch. A
  // rank with non-finite statistics and a positive count makes them
  // non-finite on every rank, so that every rank's guarded update skips.
  std::vector<Welford<double>> merged(channels);
  for (int64_t rank = 0; rank < group_size; ++rank) {
    for (int64_t i = 0; i < kHeader; ++i) {
      TORCH_CHECK(all[rank][i] == all[0][i], "the ranks are out of step: their all_gather of batch statistics paired "
                  "different forwards (", describe_rows(rows.view({group_size, row_size}).narrow(1, 0, kHeader),
                  "forward"), ")", kSameForwards);
    }
    const double n = all[rank][kHeader];
    bool finite = true;
    for (int64_t c = 0; c < channels; ++c) {
      const double mean = all[rank][kStats + c], var = all[rank][kStats + channels + c];
      finite = finite && std::isfinite(mean) && std::isfinite(var);
      merged[c].merge(Welford<double>{mean, var * n, n});
    }
    batch[rank][0] = int64_t(n);
    batch[rank][1] = int64_t(all[rank][kHeader + 1]);
    batch[rank][2] = finite;
  }
  // In the accumulation type, invstd as the local kernels compute it. An
  // empty group batch gives 0 and 1/sqrt(eps), which update nothing.
  const bool pinned = input.is_cuda();
  Tensor mean = host_empty({channels}, acc, pinned), invstd = host_empty({channels}, acc, pinned);
  AT_DISPATCH_FLOATING_TYPES(acc, "safebn_gather_statistics", [&] {
    scalar_t* mean_out = mean.data_ptr<scalar_t>();
    scalar_t* invstd_out = invstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      const Welford<double>& s = merged[c];
      mean_out[c] = scalar_t(s.mean);
      invstd_out[c] = invstd_from_var(scalar_t(s.count > 0 ? s.variance() : 0.0), scalar_t(eps));
    }
  });
  return {on_device(mean, input.device()), on_device(invstd, input.device()), group_batch};
}

// A degenerate group batch (one value per channel over the group): 0/0
// variance, normalized with the running statistics where given, else left
// unnormalized (zeros).
Tensor degenerate_output(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& running_mean, const OptionalTensor& running_var,
                         const OptionalTensor& counters, double eps, int64_t activation, double activation_param) {
  if (running_mean.has_value())
    return eval_op().call(input, weight, bias, *running_mean, *running_var, counters, eps, activation,
                          activation_param);
  return at::zeros_like(input);
}

Tensor normalized(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
                  const Tensor& invstd, int64_t activation, double activation_param) {
  return values_per_channel(input) > 0
             ? normalize_op().call(input, weight, bias, mean, invstd, activation, activation_param)
             : at::empty_like(input);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sync_batch_norm_train(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps, c10::string_view group_name, int64_t group_size, int64_t module,
    int64_t name, bool degenerate_uses_running_stats, bool refuse_single_sample, int64_t activation,
    double activation_param) {
  // Every argument checked before the collective: no gather is made with bad ones.
  check_eps(eps);
  check_input(input);
  check_channel_tensor(weight, input, "weight");
  check_channel_tensor(bias, input, "bias");
  check_training_buffers(input, running_mean, running_var, num_batches_tracked, counters, momentum);
  activation_arg(activation, activation_param);
  auto [mean, invstd, group_batch] = gather_statistics(input, eps, group_name, group_size, module, name);
  const GroupTotals group = totals(group_batch);
  if (group.degenerate()) {
    const bool with_running_stats = degenerate_uses_running_stats && running_mean.has_value();
    return {degenerate_output(input, weight, bias, with_running_stats ? running_mean : std::nullopt, running_var,
                              counters, eps, activation, activation_param),
            mean, invstd, group_batch};
  }
  const bool single_sample = group.examples == 1 && group.count > 1;
  if (!(single_sample && refuse_single_sample)) {
    update_op().call(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias,
                     group.count, eps, momentum, single_sample);
  }
  return {normalized(input, weight, bias, mean, invstd, activation, activation_param), mean, invstd, group_batch};
}

Tensor sync_normalize(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                      const OptionalTensor& running_mean, const OptionalTensor& running_var, const Tensor& mean,
                      const Tensor& invstd, const Tensor& group_batch, double eps,
                      c10::string_view /*group_name: its backward's*/, int64_t activation, double activation_param) {
  check_eps(eps);
  check_input(input);
  check_channel_tensor(mean, input, "mean");
  check_channel_tensor(invstd, input, "invstd");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "sync_normalize takes running_mean and "
              "running_var together, or neither");
  if (totals(group_batch).degenerate())
    return degenerate_output(input, weight, bias, running_mean, running_var, std::nullopt, eps, activation,
                             activation_param);
  return normalized(input, weight, bias, mean, invstd, activation, activation_param);
}

Grads sync_batch_norm_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd,
                               const Tensor& group_batch, c10::string_view group_name,
                               std::array<bool, 3> output_mask, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, double eps, int64_t activation,
                               double activation_param) {
  const GroupTotals group = totals(group_batch);
  if (group.degenerate()) {  // normalized with the running statistics: constants, no collective
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "the backward of a degenerate batch "
                "normalized with the running statistics needs them");
    const at::ScalarType acc = accumulate_type(input.scalar_type());
    return backward_op().call(grad_output, input, weight, bias, running_mean->to(acc),
                              (running_var->to(acc) + eps).rsqrt(), /*train=*/false, output_mask, activation,
                              activation_param, /*virtual_batch_size=*/0);
  }
  // The gradient in the kernels' layout once, rather than in each of the two
  // ops: an expanded one (the gradient of .sum()) would be copied twice.
  check_grad_output(grad_output, input);
  const Tensor dy = with_layout_of(grad_output, input);
  // grad_weight and grad_bias are this rank's share, as nn.SyncBatchNorm
  // returns them: DDP averages parameter gradients over the ranks, and summing
  // them here as well would scale them by the world size.
  auto [sums, grad_weight, grad_bias] = backward_reduce_op().call(
      dy, input, mean, invstd, weight, bias, {output_mask[1], output_mask[2]}, activation, activation_param);
  Tensor grad_input;
  if (output_mask[0]) {
    all_reduce_sum_(sums, group_name);
    grad_input = values_per_channel(input) > 0
                     ? backward_elemt_op().call(dy, input, weight, mean, invstd, sums, group.count, bias, activation,
                                                activation_param)
                     : at::empty_like(input);
  }
  return {grad_input, grad_weight, grad_bias};
}

// sync_batch_norm_train's output and group_batch alone (ops.def), its
// statistics kept as the module's latest. Tracing runs this kernel (a
// composite) on fake tensors: only real ones are kept.
std::tuple<Tensor, Tensor> sync_batch_norm(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked, const OptionalTensor& counters,
    std::optional<double> momentum, double eps, c10::string_view group_name, int64_t group_size, int64_t module,
    int64_t name, bool degenerate_uses_running_stats, bool refuse_single_sample, int64_t activation,
    double activation_param) {
  auto [output, mean, invstd, group_batch] = sync_train_op().call(
      input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps, group_name,
      group_size, module, name, degenerate_uses_running_stats, refuse_single_sample, activation, activation_param);
  if (!mean.key_set().has(c10::DispatchKey::Python)) {
    const std::lock_guard<std::mutex> lock(protocol_mutex);
    registrations.at({std::string(group_name), module}).latest = GroupStatistics{mean, invstd, group_batch};
  }
  return {std::move(output), std::move(group_batch)};
}

}  // namespace

std::optional<std::tuple<Tensor, Tensor, Tensor>> latest_group_statistics(c10::string_view group_name,
                                                                           int64_t module) {
  const std::lock_guard<std::mutex> lock(protocol_mutex);
  const auto found = registrations.find({std::string(group_name), module});
  if (found == registrations.end()) return std::nullopt;
  return found->second.latest;
}

TORCH_LIBRARY_IMPL(safebn, CompositeImplicitAutograd, m) { m.impl("sync_batch_norm", &sync_batch_norm); }

TORCH_LIBRARY_IMPL(safebn, CompositeExplicitAutograd, m) {
  m.impl("sync_batch_norm_train", &sync_batch_norm_train);
  m.impl("sync_normalize", &sync_normalize);
  m.impl("sync_batch_norm_backward", &sync_batch_norm_backward);
}

}  // namespace safebn
