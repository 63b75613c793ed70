"""SafeSyncBatchNorm: batch statistics over every rank of a torch.distributed
process group, as nn.SyncBatchNorm computes them, with SafeBatchNorm's guards
applied to the group's statistics.

A training forward (group_forward.py) is one op of csrc/sync.cpp,
safebn::sync_batch_norm_train (in eager code sync_batch_norm, which keeps
the group's statistics in C++): its one collective, an all_gather of each
rank's row (a header, count, batch size, mean and variance: 2C + 7 float64
values, padded to the group's longest row), the rows merged on the host,
the normalization with the group's statistics and the local path's guarded
update on them. A recomputation under activation checkpointing normalizes
with the first pass's statistics (safebn::sync_normalize). A backward that needs the
input's gradient makes one more collective, an all_reduce of the two
per-channel sums (2C values). The collectives are torch's functional ones,
and torch.compile keeps the ops whole (their fake kernels give the shapes).
Every decision (degenerate batch, single example, non-finite statistics) is
taken from the gathered values, which are the same on every rank, so that
every rank takes the same one and no rank is left waiting in a collective
the others skipped."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ._ops import group_totals
from .group_forward import RecomputedStatistics
from .modules import _SafeBatchNormMixin
from .state import SafetyState

__all__ = ["SafeSyncBatchNorm", "GroupSafetyState"]

_DISTRIBUTED = dist.is_available()


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
        # The latest synchronized batch's, a row per rank of group_ranks, as the op returned it (messages read it).
        self.group_batch = torch.empty(0, 3, dtype=torch.int64)
        self.nonfinite_ranks: list[int] = []  # ranks at fault in the latest event not yet reported
        self.recomputed = RecomputedStatistics()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "recomputed": RecomputedStatistics()}

    def __setstate__(self, state: dict) -> None:
        # Pickled before counts_by_rank() was derived from group_batch, a state holds it as a dict.
        # And before group_batch was kept as the op's tensor, as a list.
        state.pop("counts_by_rank", None)
        group_batch = state.get("group_batch", [])
        if not isinstance(group_batch, torch.Tensor):
            state["group_batch"] = torch.tensor(group_batch, dtype=torch.int64).reshape(-1, 3)
        super().__setstate__(state)

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
            f"batch: {self.counts_by_rank()})"
        )

    def counts_by_rank(self) -> dict[int, int]:
        """The latest synchronized batch's values per channel, by global rank."""
        return dict(zip(self.group_ranks, self.group_batch[:, 0].tolist()))

    def after_group_batch(self, counters: torch.Tensor | None, shape: Sequence[int], group_batch: torch.Tensor,
                          group: str, uses_running_stats: bool) -> None:
        """After a training forward over `group` (its name): records the
        group's batch for the messages, then SafetyState.after_group_totals."""
        count, examples, finite = group_totals(group_batch)
        if self.group_name != group:
            self.group_name = group
            self.group_ranks = dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group))
        self.group_batch = group_batch
        if not finite and counters is not None and self.policy.on_nonfinite != "skip" and not self.nonfinite_ranks:
            # kept for the message that reports the event (the first not reported yet)
            rows = group_batch.tolist()
            self.nonfinite_ranks = [rank for rank, (values, _, ok) in zip(self.group_ranks, rows) if values and not ok]
        self.after_group_totals(counters, shape, count, examples, group_batch, uses_running_stats)

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

    def _synchronizing(self) -> tuple[str, int] | None:
        """The name and size of the process group whose statistics a call
        takes now, or None: in eval mode (and with frozen statistics)
        nn.SyncBatchNorm normalizes each rank on its own, as does a group of one."""
        # dist.get_world_size's decisions, spelled out: this runs at every call.
        world = dist.group.WORLD if _DISTRIBUTED else None  # None before init_process_group and after its destroy
        if world is None or not self.training or self.safety_state.policy.freeze_stats:
            return None
        group = self.process_group if self.process_group is not None else world
        if group == dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a rank outside the group
            return None
        size = group.size()
        return (group.group_name, size) if size > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None, **options) -> torch.nn.Module:
        """nn.SyncBatchNorm.convert_sync_batchnorm's counterpart: every batch
        norm of `module` that torch_safebn guards becomes a SafeSyncBatchNorm
        synchronized over `process_group` (default: the whole world), in place;
        returns the module. The safety options go to every one of them."""
        from .convert import convert_model

        return convert_model(module, distributed=True, process_group=process_group, **options)
