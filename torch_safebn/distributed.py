"""SafeSyncBatchNorm: batch statistics over every rank of a torch.distributed
process group, as nn.SyncBatchNorm computes them, with SafeBatchNorm's guards
applied to the group's statistics.

Communication: a training forward makes one collective, an all_gather of each
rank's [count, batch size, mean, variance] (2C + 2 float64 values); a backward
that needs the input's gradient makes one more, an all_reduce of the two
per-channel sums [sum_dy, sum_dy_xmu] (2C values). Every decision (degenerate
batch, single example, non-finite statistics) is taken from the gathered
values, which are the same on every rank, so every rank takes the same one
and no rank is left waiting in a collective the others skipped."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional
from ._ops import OPS
from .modules import _SafeBatchNormMixin
from .reference import accumulate_dtype
from .safety import SafetyState

__all__ = ["SafeSyncBatchNorm", "sync_batch_norm"]


class GroupSafetyState(SafetyState):
    """A SafeSyncBatchNorm's bookkeeping: its messages also say which rank
    speaks and how the group's batch was spread over the ranks, and a
    non-finite event names the rank(s) whose statistics were non-finite."""

    def __init__(self, policy, owner: str):
        super().__init__(policy, owner)
        self.rank: int | None = None  # this process's global rank, once it has synchronized
        self.counts_by_rank: dict[int, int] = {}  # of the latest synchronized batch
        self.nonfinite_ranks: list[int] = []  # ranks at fault in the latest event not yet reported

    def describe(self) -> str:
        if self.rank is None:
            return super().describe()
        return (
            f"{super().describe()}, rank {self.rank} (values per channel by rank in the latest synchronized "
            f"batch: {self.counts_by_rank})"
        )

    def nonfinite_message(self, values: list[int], shape: tuple | None) -> str:
        message = super().nonfinite_message(values, shape)
        # Each event is reported once; its ranks go with it, so that a later
        # event (a non-finite weight, say) is not blamed on them.
        ranks, self.nonfinite_ranks = self.nonfinite_ranks, []
        if ranks:
            message += (
                f" The non-finite batch statistics came from rank{'s' if len(ranks) > 1 else ''} "
                f"{', '.join(map(str, ranks))} of the process group; every rank skipped this update."
            )
        return message


@dataclasses.dataclass
class _GroupStatistics:
    """A forward's statistics of the group's batch: mean and invstd per
    channel, in the accumulation dtype on the input's device; the rest on the host."""

    mean: torch.Tensor
    invstd: torch.Tensor
    count: int  # values per channel over the group
    examples: int  # the group's batch size
    counts_by_rank: dict[int, int]  # values per channel, by global rank
    nonfinite_ranks: list[int]  # the global ranks whose statistics were not finite


@torch.no_grad()
def _gather_statistics(input: torch.Tensor, eps: float, group) -> _GroupStatistics:
    """This rank's statistics from batch_stats, merged with every other
    rank's after one all_gather."""
    channels = input.shape[1]
    count = input.numel() // channels
    # This rank's row: [count, batch size, mean (C), variance (C)], in float64
    # so that counts stay exact and the merge loses nothing. An empty batch
    # sends zeros, which its count of 0 weighs out of the merge (its
    # batch_stats would be NaN and poison every rank).
    row = torch.zeros(2 * channels + 2, dtype=torch.float64, device=input.device)
    row[0], row[1] = count, input.shape[0]
    if count:
        row[2:].view(2, channels).copy_(torch.stack(OPS.batch_stats(input)))
    # all_gather into a list: one collective, and the one form that every
    # backend supports in every torch version pyproject.toml allows.
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    rows = torch.stack(rows)
    counts, means, variances = rows[:, :1], rows[:, 2 : 2 + channels], rows[:, 2 + channels :]
    nonfinite = ~torch.isfinite(rows[:, 2:]).all(dim=1, keepdim=True)
    # The forward's one host synchronization, as in nn.SyncBatchNorm: the ops
    # take the group's count as an integer.
    host = torch.cat([rows[:, :2], nonfinite.double()], dim=1).tolist()
    total = int(sum(r[0] for r in host))

    # Chan's merge: the statistics of the concatenated batch. A rank with
    # non-finite statistics and a positive count makes them non-finite on
    # every rank, so that every rank's guarded update skips.
    share = counts / max(total, 1)
    mean = (share * means).sum(0)
    var = (share * (variances + (means - mean) ** 2)).sum(0)
    acc = accumulate_dtype(input.dtype)
    ranks = dist.get_process_group_ranks(group)
    return _GroupStatistics(
        mean=mean.to(acc),
        invstd=torch.rsqrt(var.to(acc) + eps),
        count=total,
        examples=int(sum(r[1] for r in host)),
        counts_by_rank={rank: int(r[0]) for rank, r in zip(ranks, host)},
        nonfinite_ranks=[rank for rank, r in zip(ranks, host) if r[2]],
    )


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalization with the group's statistics; the backward all-reduces the
    two per-channel sums. The statistics come in as constants: backward_elemt
    accounts for their dependence on every rank's input through those sums."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, invstd, count, group):
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return OPS.normalize(input, weight, bias, mean, invstd)

    @staticmethod
    @once_differentiable  # the collective inside cannot be differentiated again
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        sum_dy, sum_dy_xmu = OPS.backward_reduce(grad_output, input, mean)
        # grad_weight and grad_bias are this rank's share, as nn.SyncBatchNorm
        # returns them: DDP averages parameter gradients over the ranks, and
        # summing them here as well would scale them by the world size.
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            if ctx.count:
                sums = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(sums, group=ctx.group)
                sum_dy, sum_dy_xmu = sums.chunk(2)
                grad_input = OPS.backward_elemt(
                    grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, ctx.count
                )
            else:  # every rank's batch is empty (the count is the group's): nothing to reduce
                grad_input = torch.empty_like(input)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    *,
    num_batches_tracked: torch.Tensor | None,
    counters: torch.Tensor | None,
    state: SafetyState,
    group,
) -> torch.Tensor:
    """Training-mode batch norm with statistics over every rank of `group`.

    Every rank of the group must call it for the same layers in the same order
    (ranks may hold different batch sizes, an empty one included). The checks
    of SafeBatchNorm apply to the group's batch: one value per channel is
    degenerate only if the whole group holds one. Eager only: the collectives
    and the host's decisions run in Python."""
    guarded = state.policy.checks
    counters = counters if guarded else None
    shape = tuple(input.shape)

    stats = _gather_statistics(input, eps, group)
    if isinstance(state, GroupSafetyState):
        state.rank, state.counts_by_rank = dist.get_rank(), stats.counts_by_rank
        # kept for the message that reports the event ("skip" gives none)
        if stats.nonfinite_ranks and guarded and state.policy.on_nonfinite != "skip":
            state.nonfinite_ranks = stats.nonfinite_ranks

    if stats.count == 1:
        if not guarded:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got 1 over the process group "
                f"(values per channel by rank: {stats.counts_by_rank})"
            )
        if state.policy.on_degenerate == "running_stats" and running_mean is not None:
            # Normalized with the running statistics, on this rank alone.
            state.degenerate_handled(counters, shape)
            return functional.guarded_batch_norm(input, weight, bias, running_mean, running_var,
                                                 num_batches_tracked, counters, False, momentum, eps, state)
        state.degenerate_refused(shape)
    single_sample = guarded and stats.examples == 1 and stats.count > 1
    if single_sample:
        state.single_sample(counters, shape)

    output = _SyncBatchNormFunction.apply(input, weight, bias, stats.mean, stats.invstd, stats.count, group)
    if running_mean is not None or counters is not None:
        OPS.update_running_stats(running_mean, running_var, num_batches_tracked, counters, stats.mean, stats.invstd,
                                 weight, bias, stats.count, eps, momentum, single_sample)
    if counters is not None:
        state.after_op(counters, shape, training=True)
    return output


class SafeSyncBatchNorm(_SafeBatchNormMixin, _BatchNorm):
    """nn.SyncBatchNorm, guarded: the same constructor (plus SafeBatchNorm's
    keyword-only safety options), the same state_dict keys, the same numbers.

    In training, with torch.distributed initialized and more than one rank in
    the process group, the statistics are those of the group's concatenated
    batch; otherwise it is SafeBatchNorm (eval mode, freeze_stats=True, one
    process). Works with gloo on CPU and NCCL on CUDA.

    It derives from nn.SyncBatchNorm's base class, not from nn.SyncBatchNorm:
    DistributedDataParallel refuses any nn.SyncBatchNorm instance in a CPU
    model, and this module runs on CPU too."""

    _safety_state_class = GroupSafetyState

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        **options,  # the safety options and the installed torch's options, e.g. bias=False
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError(
                f"SafeSyncBatchNorm({self.num_features}) got an input with 0 channels (shape {list(input.shape)}): "
                f"expected {self.num_features} in dimension 1"
            )
        # In eval mode (and with frozen statistics) nn.SyncBatchNorm normalizes
        # each rank on its own, as does a group of one.
        if not (self.training and not self.policy.freeze_stats and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) < 2:
            return super().forward(input)
        return sync_batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked,
            counters=self.safety_counters,
            state=self.safety_state,
            group=group,
        )
