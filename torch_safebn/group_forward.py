"""The training forward of a batch norm whose statistics are a process
group's (SafeSyncBatchNorm's, through functional.guarded_forward): the
group's statistics gathered by safebn::sync_batch_stats, then normalized and
guarded by safebn::sync_batch_norm_train (csrc/sync.cpp), and what the host
does about them. It lives apart from the module (distributed.py, which
imports functional.py) so that functional.py imports it once, at the top,
rather than at every call."""
from __future__ import annotations

import torch

from ._ops import OPS
from .state import Event

__all__ = ["sync_forward", "RecomputedStatistics"]

# The ops of a synchronized forward, looked up once (as functional.py's).
_GROUP_STATS, _GROUP_TRAIN = OPS.sync_batch_stats.default, OPS.sync_batch_norm_train.default


def sync_forward(bn, input: torch.Tensor, weight, bias, buffers, counters, group, compiling: bool, recomputing: bool,
                 activation: int = 0, activation_param: float = 0.0) -> torch.Tensor:
    """guarded_forward's training call with the statistics of `group`, given
    the module's parameters, running buffers (mean, var, batches tracked) and
    counters as guarded_forward read them (a module attribute costs a lookup).
    A recomputation reuses the statistics of the first pass where it can
    (RecomputedStatistics.reuse), else gathers them again, and
    updates and counts nothing, as does a micro-batch whose statistics are
    pooled (statistics.accumulate_stats)."""
    state = bn.safety_state
    policy = state.policy
    name = group.group_name
    statistics = state.recomputed.reuse(input.shape) if recomputing else None
    if statistics is None:
        statistics = _gathered(state, input, bn.eps, name, group.size(), compiling)
    if recomputing or state.pool is not None:
        mean, invstd, group_batch = statistics
        if not recomputing:
            count, examples = (int(v) for v in group_batch[:, :2].sum(0))
            state.pool.add_invstd(mean, invstd, bn.eps, count, examples)
        return _GROUP_TRAIN(input, weight, bias, None, None, None, None, *statistics, bn.momentum, bn.eps, name,
                            False, False, activation, activation_param)
    if not compiling:
        state.recomputed.remember(statistics, input.shape)
    running_mean = buffers[0]
    uses_running_stats = policy.on_degenerate == "running_stats" and running_mean is not None
    output = _GROUP_TRAIN(
        input, weight, bias, *buffers, counters, *statistics, bn.momentum, bn.eps, name, uses_running_stats,
        counters is not None and policy.on_single_sample == "raise", activation, activation_param)
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
