"""A module's safety bookkeeping on the host (SafetyState): its policy, its
name in the model, and what it does about what the ops counted. The
counters live on the module's device and are written by the ops
(csrc/guard.h), so guarding costs no host synchronization: this module
turns them into warnings and errors, at once on the CPU, where reading them
is free, and on CUDA one forward later (or at check()), unless sync=True."""
from __future__ import annotations

import enum
import itertools
import weakref
from collections.abc import Sequence

import torch

from ._ops import LIBRARY, events_pending, snapshot_counters
from .caller_warnings import warn_per_call
from .contract import NUM_COUNTERS, Counter
from .errors import DegenerateBatchError, NonFiniteError
from .policy import Policy

__all__ = ["Event", "SafetyState"]


class Event(enum.IntEnum):
    """What a forward tells its SafetyState (the `event` of the safebn::observe op)."""

    TRAINING_BATCH = 0  # after a training forward: act on what the guard counted
    EVAL_CALL = 1  # after an eval forward: likewise
    SINGLE_SAMPLE = 2  # before a training forward of one example
    DEGENERATE_HANDLED = 3  # one value per channel, normalized with the running statistics
    DEGENERATE_REFUSED = 4  # one value per channel, and no running statistics to use: raise
    # after a training forward with a process group's statistics, which says
    # what its shape says in a local one (group_batch); the op normalized a
    # degenerate batch with the running statistics, or left it refused
    GROUP_BATCH_WITH_RUNNING_STATS = 5
    GROUP_BATCH = 6


# Every live SafetyState by its id, which compiled code hands the observe op.
_STATES: weakref.WeakValueDictionary[int, SafetyState] = weakref.WeakValueDictionary()
_IDS = itertools.count()


class SafetyState:
    """A module's safety bookkeeping on the host: its policy and its name in
    the model. The counters themselves are a buffer of the module, on its
    device; this class turns them into errors and warnings."""

    # A non-finite event under on_nonfinite="warn" is warned of once per
    # module (its message names the step, which Python's filters would not
    # recognize as a repeat); report(model) counts them all.
    warned_nonfinite = False

    def __init__(self, policy: Policy, owner: str):
        self.policy = policy
        self.owner = owner  # e.g. "SafeBatchNorm2d(16)", for messages until a name is known
        self.name: str | None = None
        # On CUDA: (device, pinned host copy, event that says it landed) for the
        # counters' snapshots, reused call after call, and the (shape, training)
        # of the call whose snapshot is on its way.
        self._snapshot: tuple[torch.device, torch.Tensor, torch.cuda.Event] | None = None
        self._pending: tuple[tuple, bool] | None = None
        # Where training forwards pool their statistics instead of updating
        # (statistics.accumulate_stats, recalibrate), or None.
        self.pool = None
        self._register()

    def _register(self) -> None:
        self.id = next(_IDS)
        _STATES[self.id] = self

    @staticmethod
    def with_id(state_id: int) -> SafetyState:
        return _STATES[state_id]

    def __getstate__(self) -> dict:
        # A snapshot in flight (a CUDA event) neither copies nor pickles:
        # deepcopy(model) and torch.save(model) drop it, as check() would read the counters anyway.
        return {**self.__dict__, "_pending": None, "_snapshot": None, "id": None, "pool": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()  # a copy is another module's

    # -- messages --------------------------------------------------------------
    def describe(self) -> str:
        if self.name is not None:
            return f"{self.owner} '{self.name}'" if self.name else f"{self.owner} (the root module)"
        return f"{self.owner} (name it in errors with torch_safebn.name_modules(model))"

    # -- what a forward tells it -----------------------------------------------------
    def observe(self, counters: torch.Tensor | None, shape: Sequence[int], event: Event,
                group_batch: torch.Tensor | None = None, group: str = "") -> None:
        """The one entry point of the forwards, eager and compiled (the observe
        op); `group_batch` and `group` (its name) after a synchronized batch."""
        if group_batch is not None:  # a SafeSyncBatchNorm's (GroupSafetyState.after_group_batch)
            # A copy: the state keeps it, and compiled code may reuse an op's
            # output buffer for a later one once this op has read it.
            self.after_group_batch(counters, shape, group_batch.clone(), group,
                                   uses_running_stats=event == Event.GROUP_BATCH_WITH_RUNNING_STATS)
        elif event == Event.TRAINING_BATCH or event == Event.EVAL_CALL:
            self.after_op(counters, shape, training=event == Event.TRAINING_BATCH)
        elif event == Event.SINGLE_SAMPLE:
            self.single_sample(counters, shape)
        elif event == Event.DEGENERATE_HANDLED:
            self.degenerate_handled(counters, shape)
        else:
            self.degenerate_refused(shape)

    def single_sample(self, counters: torch.Tensor | None, shape: Sequence[int]) -> None:
        """Before a training forward of one example with more than one value
        per channel; the forward's op counts the batches it normalizes."""
        if self.policy.on_single_sample == "ignore":
            return
        text = (
            f"{self.describe()}: the batch holds a single example (input shape {list(shape)}), so every "
            "channel's mean and variance come from that one example and the output is normalized against "
            "itself. Train with more than one example per batch (DataLoader(batch_size > 1, "
            "drop_last=True)), or pass on_single_sample='ignore' if this is intended. report(model) counts "
            "every batch norm that saw such a batch."
        )
        if self.policy.on_single_sample == "raise":
            if counters is not None:  # refused before the op that counts the others
                counters[Counter.SINGLE_SAMPLE_BATCHES] += 1
            raise DegenerateBatchError(text)
        warn_per_call("single_sample", text, id(self))

    def degenerate_handled(self, counters: torch.Tensor | None, shape: Sequence[int]) -> None:
        """A batch with one value per channel, normalized with the running statistics."""
        if counters is not None:
            counters[Counter.DEGENERATE_BATCHES] += 1
        warn_per_call(
            "degenerate",
            f"{self.describe()}: a batch with one value per channel (input shape {list(shape)}) was "
            "normalized with the running statistics, which it did not update.",
            id(self),
        )

    def degenerate_refused(self, shape: Sequence[int]) -> None:
        hint = (
            "Use batches of more than one value per channel (DataLoader(..., drop_last=True) avoids a last "
            "batch of one), or pass on_degenerate='running_stats' to normalize such batches with the running "
            "statistics."
        )
        if self.policy.on_degenerate == "running_stats":
            hint = "on_degenerate='running_stats' needs track_running_stats=True. " + hint
        raise DegenerateBatchError(
            f"{self.describe()}: Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(shape)}: the batch variance is 0/0. {hint}"
        )

    def after_group_totals(self, counters: torch.Tensor | None, shape: Sequence[int], count: int, examples: int,
                           group_batch: torch.Tensor, uses_running_stats: bool) -> None:
        """After a training forward with a process group's statistics: what a
        local forward decides from its input's shape, decided from the group's
        batch (group_batch: values per channel, examples and finite statistics
        by rank; count and examples its totals), the same on every rank."""
        if count == 0:
            return
        if count == 1:
            if counters is None:  # checks=False: native's error
                raise ValueError(f"Expected more than 1 value per channel when training, got 1 over the process "
                                 f"group (values per channel by rank: {group_batch[:, 0].tolist()})")
            if not uses_running_stats:
                self.degenerate_refused(shape)
            self.degenerate_handled(counters, shape)
            self.after_op(counters, shape, training=False)
            return
        if counters is None:
            return
        if examples == 1 and self.policy.on_single_sample != "ignore":
            self.single_sample(counters, shape)
        self.after_op(counters, shape, training=True)

    def after_op(self, counters: torch.Tensor, call: torch.Tensor | Sequence[int], training: bool) -> None:
        """Acts on what the op counted for a call on `call` (its input, or the
        input's shape). Reads the counters at once on the CPU (or with
        sync=True); on CUDA it acts on the snapshot an earlier call took, if
        that copy has landed, so that no call waits on the device."""
        if not counters.is_cuda:
            if events_pending(counters):
                self._act(counters, counters.tolist(), _shape(call), training)
            return
        shape = _shape(call)
        if torch.cuda.is_current_stream_capturing():
            return  # inside a CUDA graph the device-side guard acts alone; check() reports
        if self.policy.sync:
            self._act(counters, counters.tolist(), shape, training)
            return
        if self._pending is not None:
            _, host, landed = self._snapshot
            if not landed.query():
                return  # still in flight: keep it; the counters are cumulative, so nothing is lost
            old_shape, old_training = self._pending
            self._pending = None
            self._act(counters, host.tolist(), old_shape, old_training)
        if self._snapshot is None or self._snapshot[0] != counters.device:
            # An event records on its own device only: a module moved to another GPU gets a new one.
            self._snapshot = (counters.device, torch.empty(NUM_COUNTERS, dtype=torch.int64, pin_memory=True),
                              torch.cuda.Event())
        _, host, landed = self._snapshot
        snapshot_counters(counters, host)
        landed.record(torch.cuda.current_stream(counters.device))
        self._pending = (None if shape is None else tuple(shape), training)

    def _act(self, counters: torch.Tensor, values: list[int], shape: Sequence[int], training: bool) -> None:
        pending = unreported(values)
        if pending <= 0 or self.policy.on_nonfinite == "skip":
            return
        counters[Counter.REPORTED_EVENTS] = values[Counter.NONFINITE_EVENTS]
        # The call's shape is the event's when the event is the call's own.
        own = pending == 1 and bool(values[Counter.EVENT_IN_TRAINING]) == training and values[
            Counter.EVENT_STEP] == values[Counter.BATCHES] - training
        message = self.nonfinite_message(values, tuple(shape) if own and shape is not None else None)
        if self.policy.on_nonfinite == "raise":
            raise NonFiniteError(message)
        if not self.warned_nonfinite:
            self.warned_nonfinite = True
            warn_per_call("nonfinite", message + " Warned once per module; report(model) counts every event.",
                          id(self))

    def nonfinite_message(self, values: list[int], shape: tuple | None) -> str:
        """Describes the first event not reported yet, from the counters."""
        found = ", ".join(
            f"{what} in {values[slot]} channel{'s' if values[slot] != 1 else ''}"
            for what, slot in (
                ("mean", Counter.BAD_MEAN_CHANNELS),
                ("variance", Counter.BAD_VAR_CHANNELS),
                ("weight", Counter.BAD_WEIGHT_CHANNELS),
                ("bias", Counter.BAD_BIAS_CHANNELS),
            )
            if values[slot]
        )
        where = f" (input shape {list(shape)})" if shape is not None else ""
        step = values[Counter.EVENT_STEP]
        later = unreported(values) - 1
        more = f" {later} later event{'s' if later != 1 else ''} followed it unreported." if later > 0 else ""
        if values[Counter.EVENT_IN_TRAINING]:
            return (
                f"{self.describe()} at training step {step} (the {_ordinal(step + 1)} batch it saw){where}: "
                f"non-finite values: {found}. The running statistics were not updated from this batch.{more} "
                "NaN/Inf in the weight or bias usually means the optimizer diverged: lower the learning rate or "
                "clip gradients; NaN/Inf in the mean or variance means the input itself holds NaN/Inf or "
                "overflows its dtype. Pass on_nonfinite='skip' (or 'warn') to keep training and count such batches."
            )
        return (
            f"{self.describe()} in eval mode, after {step} training batch{'es' if step != 1 else ''}{where}: "
            f"non-finite or invalid statistics: {found} (a variance counts when running_var + eps <= 0).{more} "
            "The output is not trustworthy: reload the running statistics from a good checkpoint or recompute "
            "them in training mode."
        )


def unreported(values: list[int]) -> int:
    """Non-finite events the counters count that the host has not reported."""
    return values[Counter.NONFINITE_EVENTS] - values[Counter.REPORTED_EVENTS]


def _shape(call: torch.Tensor | Sequence[int] | None) -> Sequence[int] | None:
    return call.shape if isinstance(call, torch.Tensor) else call


def _observe_kernel(counters: torch.Tensor | None, module: int, shape: Sequence[int], event: int,
                    group_batch: torch.Tensor | None = None, group: str = "") -> None:
    """The safebn::observe op's kernel, for every device: compiled code's way
    of running SafetyState.observe, at run time, in the step that saw the event."""
    SafetyState.with_id(module).observe(counters, shape, Event(event), group_batch, group)


LIBRARY.impl("observe", _observe_kernel, "CompositeExplicitAutograd")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
