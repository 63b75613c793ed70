"""SafeSyncBatchNorm: batch statistics over every rank of a torch.distributed
process group, as nn.SyncBatchNorm computes them, with SafeBatchNorm's guards
applied to the group's statistics.

A training forward is one op, safebn::sync_batch_norm_train (csrc/sync.cpp):
one collective, an all_gather of each rank's [count, batch size, mean,
variance] (2C + 2 float64 values), and the local path's guarded update fed
the group's statistics; a backward that needs the input's gradient makes one
more, an all_reduce of the two per-channel sums (2C values). The collectives
are torch's functional ones, which torch.compile traces. Every decision
(degenerate batch, single example, non-finite statistics) is taken from the
gathered values, which are the same on every rank, so that every rank takes
the same one and no rank is left waiting in a collective the others skipped."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ._ops import OPS
from .modules import _SafeBatchNormMixin
from .state import Event, SafetyState

__all__ = ["SafeSyncBatchNorm", "GroupSafetyState"]

# The ops of a synchronized forward, looked up once (as functional.py's).
_GROUP_STATS, _GROUP_TRAIN = OPS.sync_batch_stats.default, OPS.sync_batch_norm_train.default


class GroupSafetyState(SafetyState):
    """A SafeSyncBatchNorm's bookkeeping: its messages also say which rank
    speaks and how the group's batch was spread over the ranks, and a
    non-finite event names the rank(s) whose statistics were non-finite."""

    def __init__(self, policy, owner: str):
        super().__init__(policy, owner)
        # The process group of the latest synchronized batch, by name and global
        # ranks: a reference to the group itself would keep it alive past
        # destroy_process_group(), to be torn down at interpreter exit, where
        # gloo's threads can abort the process.
        self.group_name: str | None = None
        self.group_ranks: list[int] = []
        self.counts_by_rank: dict[int, int] = {}  # its values per channel, by global rank
        self.nonfinite_ranks: list[int] = []  # ranks at fault in the latest event not yet reported
        self.recomputed = RecomputedStatistics()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "recomputed": RecomputedStatistics()}

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value
        # The name as a number the same in every process (0 while unnamed),
        # which the ranks compare in every gather; worked out here, not in the
        # forward, which torch.compile traces.
        self.name_key = int.from_bytes(hashlib.blake2b(value.encode(), digest_size=6).digest(), "little") if value else 0

    def describe(self) -> str:
        if self.group_name is None:
            return super().describe()
        return (
            f"{super().describe()}, rank {dist.get_rank()} (values per channel by rank in the latest synchronized "
            f"batch: {self.counts_by_rank})"
        )

    def after_group_batch(self, counters: torch.Tensor | None, shape: Sequence[int], group_batch: list[list[int]],
                          group: str, uses_running_stats: bool) -> None:
        if self.group_name != group:
            self.group_name = group
            self.group_ranks = dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group))
        ranks = self.group_ranks
        self.counts_by_rank = {rank: row[0] for rank, row in zip(ranks, group_batch)}
        if counters is not None and self.policy.on_nonfinite != "skip" and not self.nonfinite_ranks:
            # kept for the message that reports the event (the first not reported yet)
            self.nonfinite_ranks = [rank for rank, row in zip(ranks, group_batch) if row[0] and not row[2]]
        super().after_group_batch(counters, shape, group_batch, group, uses_running_stats)

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


def sync_forward(bn, input: torch.Tensor, running_mean, running_var, num_batches_tracked, group, compiling: bool,
                 recomputing: bool, activation: int = 0, activation_param: float = 0.0) -> torch.Tensor:
    """guarded_forward's training call with the statistics of `group`. A
    recomputation reuses the statistics of the first pass where it can
    (GroupSafetyState.recompute_statistics), else gathers them again, and
    updates and counts nothing, as does a micro-batch whose statistics are
    pooled (statistics.accumulate_stats)."""
    state = bn.safety_state
    policy = state.policy
    name, size = group.group_name, group.size()
    statistics = state.recomputed.reuse(input.shape) if recomputing else None
    if statistics is None:
        statistics = _gathered(state, input, bn.eps, name, size, compiling)
    if recomputing or state.pool is not None:
        mean, invstd, group_batch = statistics
        if not recomputing:
            count, examples = (int(v) for v in group_batch[:, :2].sum(0))
            state.pool.add_invstd(mean, invstd, bn.eps, count, examples)
        return _GROUP_TRAIN(input, bn.weight, bn.bias, None, None, None, None, *statistics, bn.momentum, bn.eps, name,
                            False, False, activation, activation_param)
    if not compiling:
        state.recomputed.remember(statistics, input.shape)
    counters = bn.safety_counters
    uses_running_stats = policy.on_degenerate == "running_stats" and running_mean is not None
    output = _GROUP_TRAIN(
        input, bn.weight, bn.bias, running_mean, running_var, num_batches_tracked, counters, *statistics,
        bn.momentum, bn.eps, name, uses_running_stats, counters is not None and policy.on_single_sample == "raise",
        activation, activation_param)
    event = Event.GROUP_BATCH_WITH_RUNNING_STATS if uses_running_stats else Event.GROUP_BATCH
    group_batch = statistics[2]
    if not compiling:
        state.observe(counters, input.shape, event, group_batch, name)
    elif not torch.compiler.is_exporting():
        OPS.observe.default(counters, state.id, list(input.shape), int(event), group_batch, name)
    return output


def _gathered(state, input: torch.Tensor, eps: float, name: str, size: int, compiling: bool):
    """safebn::sync_batch_stats; in eager code, a failed gather is explained."""
    if compiling:
        return _GROUP_STATS(input, eps, name, size, state.id, state.name_key)
    try:
        return _GROUP_STATS(input, eps, name, size, state.id, state.name_key)
    except RuntimeError as error:
        text = (f"{state.describe()}: the all_gather of the process group's batch statistics failed: {error} (Another "
                "rank may have failed, exited or timed out, or made other collectives: every rank must make the same "
                "synchronized forwards, in training mode, in the same order.)")
        try:  # the same class (a DistBackendError stays one), with the module and what to look for
            explained = type(error)(text)
        except TypeError:
            explained = RuntimeError(text)
        raise explained from error


class RecomputedStatistics:
    """The group statistics of a module's latest first-pass training forward,
    for its recomputation under activation checkpointing, which then needs
    no second collective. Reused only when the module made exactly one
    forward since its last recomputation: every rank makes the same calls,
    so every rank takes the same decision (a collective one rank skipped
    would leave the others waiting); else the statistics are gathered again."""

    def __init__(self) -> None:
        self.statistics, self.shape, self.forwards, self.recomputed = None, None, 0, False

    def remember(self, statistics, shape) -> None:
        if self.recomputed:
            self.forwards, self.recomputed = 0, False
        self.statistics, self.shape, self.forwards = statistics, tuple(shape), self.forwards + 1

    def reuse(self, shape):
        self.recomputed = True
        if self.forwards != 1:
            return None
        if tuple(shape) != self.shape:
            raise RuntimeError(f"a recomputation of SafeSyncBatchNorm saw an input of shape {list(shape)} where its "
                               f"first pass saw {list(self.shape)}: the checkpointed function must be deterministic")
        return self.statistics


class SafeSyncBatchNorm(_SafeBatchNormMixin, _BatchNorm):
    """nn.SyncBatchNorm, guarded: the same constructor (plus SafeBatchNorm's
    keyword-only safety options), the same state_dict keys, the same numbers.

    In training, with torch.distributed initialized and more than one rank in
    the process group, the statistics are those of the group's concatenated
    batch; otherwise it is SafeBatchNorm (eval mode, freeze_stats=True, one
    process). Works with gloo on CPU and NCCL on CUDA, eager and under
    torch.compile(fullgraph=True).

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

    def _validate_virtual_batch_size(self, value) -> None:
        if value is not None:
            raise ValueError("SafeSyncBatchNorm has no virtual_batch_size: its statistics are the process group's "
                             "batch. For ghost batches, use SafeBatchNorm*d(virtual_batch_size=...) on each rank.")

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synchronizing(self):
        """The process group whose statistics a call takes now, or None: in
        eval mode (and with frozen statistics) nn.SyncBatchNorm normalizes each
        rank on its own, as does a group of one."""
        if not (self.training and not self.policy.freeze_stats and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None, **options) -> torch.nn.Module:
        """nn.SyncBatchNorm.convert_sync_batchnorm's counterpart: every batch
        norm of `module` that torch_safebn guards becomes a SafeSyncBatchNorm
        synchronized over `process_group` (default: the whole world), in place;
        returns the module. The safety options go to every one of them."""
        from .convert import convert_model

        return convert_model(module, distributed=True, process_group=process_group, **options)
