"""Safety policies, errors, the per-module counters, report() and check().

The counters live on the module's device and are written by the ops (see
csrc/guard.h), so guarding costs no host synchronization. This module turns
them into warnings and errors: at once on the CPU, where reading them is
free, and on CUDA one forward later (or at check()), unless sync=True."""
from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import numbers
import os
import sys
import warnings
import weakref
from collections.abc import Sequence

import torch

__all__ = [
    "Counter",
    "SafetyError",
    "DegenerateBatchError",
    "NonFiniteError",
    "Policy",
    "SAFETY_OPTIONS",
    "SafetyState",
    "Report",
    "report",
    "check",
    "name_modules",
]


class Counter(enum.IntEnum):
    """Slots of the int64 counters tensor, in the order of csrc/guard.h."""

    BATCHES = 0
    SKIPPED_UPDATES = 1
    NONFINITE_EVENTS = 2
    DEGENERATE_BATCHES = 3
    SINGLE_SAMPLE_BATCHES = 4
    LOW_VARIANCE_CHANNELS = 5
    REPORTED_EVENTS = 6  # non-finite events the host raised or warned about
    # The first non-finite event not reported yet:
    EVENT_STEP = 7  # training batches before it
    EVENT_IN_TRAINING = 8
    BAD_MEAN_CHANNELS = 9
    BAD_VAR_CHANNELS = 10
    BAD_WEIGHT_CHANNELS = 11
    BAD_BIAS_CHANNELS = 12


NUM_COUNTERS = len(Counter)
# The counters a report shows.
REPORTED = (
    Counter.BATCHES,
    Counter.SKIPPED_UPDATES,
    Counter.NONFINITE_EVENTS,
    Counter.DEGENERATE_BATCHES,
    Counter.SINGLE_SAMPLE_BATCHES,
    Counter.LOW_VARIANCE_CHANNELS,
)


class Event(enum.IntEnum):
    """What a forward tells its SafetyState (the `event` of the safebn::observe op)."""

    TRAINING_BATCH = 0  # after a training forward: act on what the guard counted
    EVAL_CALL = 1  # after an eval forward: likewise
    SINGLE_SAMPLE = 2  # before a training forward of one example
    DEGENERATE_HANDLED = 3  # one value per channel, normalized with the running statistics
    DEGENERATE_REFUSED = 4  # one value per channel, and no running statistics to use: raise


class SafetyError(RuntimeError):
    """Base of the errors torch_safebn raises for what it guards against."""


class DegenerateBatchError(SafetyError, ValueError):
    """A training batch whose statistics cannot be estimated (one value per channel)."""


class NonFiniteError(SafetyError, FloatingPointError):
    """NaN or Inf in the batch statistics, the weight or bias, or the running statistics."""


_CHOICES = {
    "on_degenerate": ("raise", "running_stats"),
    "on_nonfinite": ("raise", "warn", "skip"),
    "on_single_sample": ("warn", "ignore", "raise"),
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a module does about each hazard; see DESIGN.md, "Safety semantics"."""

    on_degenerate: str = "raise"
    on_nonfinite: str = "raise"
    on_single_sample: str = "warn"
    freeze_stats: bool = False
    checks: bool = True
    sync: bool = False

    def __post_init__(self):
        for option, allowed in _CHOICES.items():
            value = getattr(self, option)
            if value not in allowed:
                raise ValueError(f"{option} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        for option in ("freeze_stats", "checks", "sync"):
            if not isinstance(getattr(self, option), bool):
                raise ValueError(f"{option} must be True or False, got {getattr(self, option)!r}")

    def non_defaults(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


# The keyword options of the modules and convert_model that make a Policy.
SAFETY_OPTIONS = tuple(field.name for field in dataclasses.fields(Policy))


def _as_float(value) -> float | None:
    """A real number given as a Python, NumPy or 0-d tensor scalar, as float;
    None for anything else (strings, bools, tensors of several values)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def validate_eps(eps) -> float:
    """eps as a float, finite and > 0; otherwise a ValueError naming it."""
    value = _as_float(eps)
    if value is None or not 0.0 < value < math.inf:
        raise ValueError(
            f"eps must be a finite number > 0, got {eps!r}: it keeps 1/sqrt(var + eps) finite for a "
            "constant channel. The usual value is 1e-5."
        )
    return value


def validate_momentum(momentum) -> float | None:
    """momentum as None or a float in [0, 1]; otherwise a ValueError naming it."""
    if momentum is None:
        return None
    value = _as_float(momentum)
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"momentum must be None (cumulative average) or a number in [0, 1], got {momentum!r}. "
            "The usual value is 0.1."
        )
    return value


# Directories whose frames a warning skips to reach the user's line.
_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def _is_internal(filename: str) -> bool:
    # "<...>": code that torch generated (FX); "torchinductor": inductor's compiled modules.
    return filename.startswith(_INTERNAL_DIRS) or filename.startswith("<") or "torchinductor" in filename


def warn_at_caller(message: str) -> None:
    """Warns at the first frame outside torch_safebn and torch: the user's
    line, whether the module ran eagerly or inside compiled code."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


# Every live SafetyState by its id, which compiled code hands the observe op.
_STATES: weakref.WeakValueDictionary[int, SafetyState] = weakref.WeakValueDictionary()
_IDS = itertools.count()


class SafetyState:
    """A module's safety bookkeeping on the host: its policy, its name in the
    model and which warnings it gave. The counters themselves are a buffer of
    the module, on its device; this class turns them into errors and warnings."""

    # How every guarded call reads its counters: CPU counters for an event not
    # reported yet, CUDA ones by a snapshot into a pinned buffer. The
    # extension's functions where it is built (_ops.py installs them), which
    # cost a fraction of these Tensor methods.
    events_pending = staticmethod(lambda counters: _unreported(counters.tolist()) > 0)
    copy_to_host = staticmethod(lambda counters, host: host.copy_(counters, non_blocking=True))

    def __init__(self, policy: Policy, owner: str):
        self.policy = policy
        self.owner = owner  # e.g. "SafeBatchNorm2d(16)", for messages until a name is known
        self.name: str | None = None
        self._warned: set[str] = set()
        # On CUDA: (device, pinned host copy, event that says it landed) for the
        # counters' snapshots, reused call after call, and the (shape, training)
        # of the call whose snapshot is on its way.
        self._snapshot: tuple[torch.device, torch.Tensor, torch.cuda.Event] | None = None
        self._pending: tuple[tuple, bool] | None = None
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
        return {**self.__dict__, "_pending": None, "_snapshot": None, "id": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()  # a copy is another module's

    # -- messages --------------------------------------------------------------
    def describe(self) -> str:
        if self.name is not None:
            return f"{self.owner} '{self.name}'" if self.name else f"{self.owner} (the root module)"
        return f"{self.owner} (name it in errors with torch_safebn.name_modules(model))"

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_at_caller(message)

    # -- what a forward tells it -----------------------------------------------------
    def observe(self, counters: torch.Tensor, shape: Sequence[int], event: Event) -> None:
        """The one entry point of the forwards, eager and compiled (the observe op)."""
        if event == Event.TRAINING_BATCH or event == Event.EVAL_CALL:
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
            "drop_last=True)), or pass on_single_sample='ignore' if this is intended."
        )
        if self.policy.on_single_sample == "raise":
            if counters is not None:  # refused before the op that counts the others
                counters[Counter.SINGLE_SAMPLE_BATCHES] += 1
            raise DegenerateBatchError(text)
        self.warn_once("single_sample", text)

    def degenerate_handled(self, counters: torch.Tensor | None, shape: Sequence[int]) -> None:
        """A batch with one value per channel, normalized with the running statistics."""
        if counters is not None:
            counters[Counter.DEGENERATE_BATCHES] += 1
        self.warn_once(
            "degenerate",
            f"{self.describe()}: a batch with one value per channel (input shape {list(shape)}) was "
            "normalized with the running statistics, which it did not update.",
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
            f"{self.describe()}: expected more than 1 value per channel when training, got input shape "
            f"{list(shape)}: the batch variance is 0/0. {hint}"
        )

    def after_op(self, counters: torch.Tensor, call: torch.Tensor | Sequence[int], training: bool) -> None:
        """Acts on what the op counted for a call on `call` (its input, or the
        input's shape). Reads the counters at once on the CPU (or with
        sync=True); on CUDA it acts on the snapshot an earlier call took, if
        that copy has landed, so that no call waits on the device."""
        if not counters.is_cuda:
            if self.events_pending(counters):
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
        self.copy_to_host(counters, host)
        landed.record(torch.cuda.current_stream(counters.device))
        self._pending = (tuple(shape), training)

    def _act(self, counters: torch.Tensor, values: list[int], shape: Sequence[int], training: bool) -> None:
        unreported = _unreported(values)
        if unreported <= 0 or self.policy.on_nonfinite == "skip":
            return
        counters[Counter.REPORTED_EVENTS] = values[Counter.NONFINITE_EVENTS]
        # The call's shape is the event's when the event is the call's own.
        own = unreported == 1 and bool(values[Counter.EVENT_IN_TRAINING]) == training and values[
            Counter.EVENT_STEP] == values[Counter.BATCHES] - training
        message = self.nonfinite_message(values, tuple(shape) if own else None)
        if self.policy.on_nonfinite == "raise":
            raise NonFiniteError(message)
        self.warn_once("nonfinite", message + " (warned once; report(model) counts every event)")

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
        later = _unreported(values) - 1
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


def _unreported(values: list[int]) -> int:
    return values[Counter.NONFINITE_EVENTS] - values[Counter.REPORTED_EVENTS]


def _shape(call: torch.Tensor | Sequence[int]) -> Sequence[int]:
    return call.shape if isinstance(call, torch.Tensor) else call


def observe_kernel(counters: torch.Tensor, module: int, shape: Sequence[int], event: int) -> None:
    """The safebn::observe op's kernel: compiled code's way of running
    SafetyState.observe, at run time, in the step that saw the event."""
    SafetyState.with_id(module).observe(counters, shape, Event(event))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclasses.dataclass
class Report:
    """Counters of every batch norm of a model, one row each: torch_safebn's
    modules with their counters, and batch norms left unguarded (guarded
    False, no counters). str() is a table."""

    rows: list[dict]

    def __str__(self) -> str:
        if not self.rows:
            return "no batch norms"
        columns = ["module", "class"] + [c.name.lower() for c in REPORTED]
        table = [columns] + [[str(row[c]) if row["guarded"] else "-" for c in columns[2:]] for row in self.rows]
        for row, cells in zip(self.rows, table[1:]):
            cells[:0] = [row["module"], row["class"] + ("" if row["guarded"] else " (unguarded)")]
        widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
        lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _guarded_modules(model: torch.nn.Module):
    name_modules(model)
    for module in model.modules():
        state = getattr(module, "safety_state", None)
        if isinstance(state, SafetyState):
            yield module, state


def name_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Gives every torch_safebn module its qualified name in `model` (e.g.
    'layer1.0.bn1') for errors and reports. convert_model() does this too."""
    for name, module in model.named_modules():
        state = getattr(module, "safety_state", None)
        if isinstance(state, SafetyState):
            state.name = name
    return model


_WATCHED = ("weight", "bias", "running_mean", "running_var")


def _snapshots(modules) -> list[tuple[list[int] | None, list[str]]]:
    """Each module's counters and the names of its parameters and running
    statistics that hold NaN/Inf now, in one host transfer for the model."""
    if not modules:
        return []
    rows = []
    for m in modules:
        device = next((t.device for t in itertools.chain(m.buffers(), m.parameters())), torch.device("cpu"))
        counters = m.safety_counters if m.safety_counters is not None else torch.full((NUM_COUNTERS,), -1, device=device)
        finite = [torch.isfinite(t).all() if t is not None else torch.ones((), dtype=torch.bool, device=device)
                  for t in (getattr(m, name) for name in _WATCHED)]
        rows.append(torch.cat([counters.long(), torch.stack(finite).long()]).cpu())
    snapshots = []
    for m, row in zip(modules, torch.stack(rows).tolist()):
        counters = row[:NUM_COUNTERS] if m.safety_counters is not None else None
        nonfinite = [name for name, ok in zip(_WATCHED, row[NUM_COUNTERS:]) if not ok]
        snapshots.append((counters, nonfinite))
    return snapshots


def report(model: torch.nn.Module) -> Report:
    """Reads the counters of every torch_safebn module of `model` (one
    sync), and lists the batch norms it does not guard."""
    pairs = list(_guarded_modules(model))
    counters = {id(module): values for (module, _), (values, _) in zip(pairs, _snapshots([m for m, _ in pairs]))}
    rows = []
    for name, module in model.named_modules():
        state = getattr(module, "safety_state", None)
        if not isinstance(state, SafetyState) and not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        row = {"module": name or "(root)", "class": type(module).__name__, "guarded": isinstance(state, SafetyState)}
        values = counters.get(id(module))
        for counter in REPORTED:
            row[counter.name.lower()] = values[counter] if values is not None else "-"
        rows.append(row)
    return Report(rows)


def check(model: torch.nn.Module) -> None:
    """Raises NonFiniteError for the first module with on_nonfinite='raise'
    that either counted a non-finite event no forward has raised yet (on CUDA
    a forward raises one step late; the error names the first such event and
    its step), or whose parameters or running
    statistics hold NaN/Inf now (say, after the optimizer's last step, which
    no forward has seen). Call it after training, or every few steps."""
    pairs = list(_guarded_modules(model))
    for (module, state), (values, nonfinite) in zip(pairs, _snapshots([m for m, _ in pairs])):
        if state.policy.on_nonfinite != "raise":
            continue
        if values is not None and _unreported(values) > 0:
            module.safety_counters[Counter.REPORTED_EVENTS] = values[Counter.NONFINITE_EVENTS]
            raise NonFiniteError(state.nonfinite_message(values, None))
        if nonfinite:
            raise NonFiniteError(
                f"{state.describe()}: {', '.join(nonfinite)} hold NaN/Inf now. A non-finite weight or bias "
                "means the optimizer diverged since the last forward: lower the learning rate or clip "
                "gradients, and restart from the last good checkpoint."
            )
