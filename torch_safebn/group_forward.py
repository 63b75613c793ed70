"""The training forward of a batch norm whose statistics are a process
group's (SafeSyncBatchNorm's, through functional.guarded_forward): the
group's statistics gathered, normalized with and guarded in one op,
safebn::sync_batch_norm_train (csrc/sync.cpp; in eager code its
sync_batch_norm, which returns only what the host reads), and what the host
does about them. It lives apart from the module (distributed.py, which imports
functional.py) so that functional.py imports it once, at the top, rather than
at every call."""
from __future__ import annotations

import torch

from ._ops import BACKEND, OPS, group_statistics, group_totals
from .state import Event

__all__ = ["sync_forward", "RecomputedStatistics"]

# The ops of a synchronized forward, looked up once (as functional.py's): the
# eager one returns only what the host reads (its statistics stay in C++).
_GROUP_TRAIN, _GROUP_EAGER = OPS.sync_batch_norm_train.default, OPS.sync_batch_norm.default
_GROUP_NORMALIZE = OPS.sync_normalize.default


def sync_forward(bn, input: torch.Tensor, weight, bias, buffers, counters, group, compiling: bool, recomputing: bool,
                 activation: int = 0, activation_param: float = 0.0) -> torch.Tensor:
    """guarded_forward's training call with the statistics of `group` (its name and size), given
    the module's parameters, running buffers (mean, var, batches tracked) and
    counters as guarded_forward read them (a module attribute costs a lookup).
    A recomputation normalizes with the statistics of the first pass where it
    can (RecomputedStatistics.reusable), else gathers them again, and updates
    and counts nothing, as does a micro-batch whose statistics are pooled
    (statistics.accumulate_stats)."""
    state = bn.safety_state
    policy = state.policy
    fused = (activation, activation_param) if activation else ()
    running_mean, running_var, _ = buffers
    uses_running_stats = policy.on_degenerate == "running_stats" and running_mean is not None
    name = group[0]
    unguarded = (None, None, None), None, group, compiling, False, False, fused  # no buffers, no counters
    if recomputing:
        if BACKEND == "reference":
            raise NotImplementedError(
                f"{state.describe()}: activation checkpointing of SafeSyncBatchNorm needs torch_safebn's compiled "
                "extension (the reference implementation differentiates through the group's statistics, which a "
                "recomputation reuses). Rebuild the extension, or leave this module outside the checkpoint.")
        # Normalized as the first pass was, saving what it saved for the backward.
        if state.recomputed.reusable(input.shape):
            statistics = group_statistics(name, state.id)
        else:  # gathered again, as on every rank (its normalization dropped: a rare path)
            with torch.no_grad():
                statistics = _train(bn, _GROUP_TRAIN, input, weight, bias, *unguarded)[1:]
        held = (running_mean, running_var) if uses_running_stats else (None, None)
        return _GROUP_NORMALIZE(input, weight, bias, *held, *statistics, bn.eps, name, *fused)
    if state.pool is not None:
        output, mean, invstd, group_batch = _train(bn, _GROUP_TRAIN, input, weight, bias, *unguarded)
        count, examples, _ = group_totals(group_batch)
        state.pool.add_invstd(mean, invstd, bn.eps, count, examples)
        return output
    refuse_single_sample = counters is not None and policy.on_single_sample == "raise"
    if not compiling:  # the hot path, spelled out: state.observe's branch for a group batch
        output, group_batch = _train(bn, _GROUP_EAGER, input, weight, bias, buffers, counters, group, compiling,
                                     uses_running_stats, refuse_single_sample, fused)
        state.recomputed.remember(input.shape)
        state.after_group_batch(counters, input.shape, group_batch, name, uses_running_stats)
        return output
    output, _, _, group_batch = _train(bn, _GROUP_TRAIN, input, weight, bias, buffers, counters, group, compiling,
                                       uses_running_stats, refuse_single_sample, fused)
    if not torch.compiler.is_exporting():
        event = Event.GROUP_BATCH_WITH_RUNNING_STATS if uses_running_stats else Event.GROUP_BATCH
        OPS.observe.default(counters, state.id, list(input.shape), int(event), group_batch, name)
    return output


def _train(bn, op, input, weight, bias, buffers, counters, group: tuple, compiling: bool, uses_running_stats: bool,
           refuse_single_sample: bool, fused: tuple):
    """`op` (safebn::sync_batch_norm_train, or sync_batch_norm) over the
    process group `group` (its name and size). In eager code, its errors name the
    module (and, for a failed gather, its rank)."""
    state = bn.safety_state
    arguments = (input, weight, bias, *buffers, counters, bn.momentum, bn.eps, *group, state.id, state.name_key,
                 uses_running_stats, refuse_single_sample, *fused)
    if compiling:
        return op(*arguments)
    try:
        return op(*arguments)
    except RuntimeError as error:
        text = f"{state.describe()}: {error}"
        try:  # the same class (a DistBackendError stays one), with the module
            explained = type(error)(text)
        except TypeError:
            explained = RuntimeError(text)
        raise explained from error


class RecomputedStatistics:
    """Whether a module's recomputation under activation checkpointing may
    normalize with the group statistics of its latest first-pass training
    forward (which safebn::sync_batch_norm kept in C++), and so need no
    second collective: only when the module made exactly one such forward
    since its last recomputation. Every rank makes the same calls, so every
    rank takes the same decision (a collective one rank skipped would leave
    the others waiting); else the statistics are gathered again."""

    def __init__(self) -> None:
        self.shape, self.forwards, self.recomputed = None, 0, False

    def remember(self, shape: torch.Size) -> None:
        if self.recomputed:
            self.forwards, self.recomputed = 0, False
        self.shape, self.forwards = shape, self.forwards + 1

    def reusable(self, shape: torch.Size) -> bool:
        self.recomputed = True
        if self.forwards != 1:
            return False
        if shape != self.shape:
            raise RuntimeError(f"a recomputation of SafeSyncBatchNorm saw an input of shape {list(shape)} where its "
                               f"first pass saw {list(self.shape)}: the checkpointed function must be deterministic")
        return True
