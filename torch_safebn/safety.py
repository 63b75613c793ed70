"""Safety policies, errors, the per-module counters, report() and check().

The counters live on the module's device and are written by the ops (see
csrc/guard.h), so guarding costs no host synchronization. This module turns
them into warnings and errors: at once on the CPU, where reading them is
free, and on CUDA one forward later (or at check()), unless sync=True."""
from __future__ import annotations

import dataclasses
import enum
import itertools
import warnings

import torch

__all__ = [
    "Counter",
    "SafetyError",
    "DegenerateBatchError",
    "NonFiniteError",
    "Policy",
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
    BAD_MEAN_CHANNELS = 6
    BAD_VAR_CHANNELS = 7
    BAD_WEIGHT_CHANNELS = 8
    BAD_BIAS_CHANNELS = 9


NUM_COUNTERS = len(Counter)
# The counters a report shows; the BAD_* slots describe the latest event only.
REPORTED = (
    Counter.BATCHES,
    Counter.SKIPPED_UPDATES,
    Counter.NONFINITE_EVENTS,
    Counter.DEGENERATE_BATCHES,
    Counter.SINGLE_SAMPLE_BATCHES,
    Counter.LOW_VARIANCE_CHANNELS,
)


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


def validate_hyperparameters(eps, momentum) -> None:
    """eps finite and > 0; momentum None or within [0, 1]. Raises ValueError naming the argument."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < float(eps) < float("inf")):
        raise ValueError(
            f"eps must be a finite number > 0, got {eps!r}: it keeps 1/sqrt(var + eps) finite for a "
            "constant channel. The usual value is 1e-5."
        )
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0
    ):
        raise ValueError(
            f"momentum must be None (cumulative average) or a number in [0, 1], got {momentum!r}. "
            "The usual value is 0.1."
        )


class SafetyState:
    """A module's safety bookkeeping on the host: its policy, its name in the
    model, which warnings it gave, and how many non-finite events it already
    reported. The counters themselves are a buffer of the module."""

    def __init__(self, policy: Policy, owner: str):
        self.policy = policy
        self.owner = owner  # e.g. "SafeBatchNorm2d(16)", for messages until a name is known
        self.name: str | None = None
        self._warned: set[str] = set()
        self._reported_nonfinite = 0
        # On CUDA: (device, pinned host copy, event that says it landed) for the
        # counters' snapshots, reused call after call, and the (shape, training)
        # of the call whose snapshot is on its way.
        self._snapshot: tuple[torch.device, torch.Tensor, torch.cuda.Event] | None = None
        self._pending: tuple[tuple, bool] | None = None

    # -- messages --------------------------------------------------------------
    def describe(self) -> str:
        if self.name is not None:
            return f"{self.owner} '{self.name}'" if self.name else f"{self.owner} (the root module)"
        return f"{self.owner} (name it in errors with torch_safebn.name_modules(model))"

    def warn_once(self, key: str, message: str) -> None:
        if key in self._warned or torch.compiler.is_compiling():
            return
        self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- host-known hazards ------------------------------------------------------
    def single_sample(self, counters: torch.Tensor | None, shape: tuple) -> None:
        if counters is not None:
            counters[Counter.SINGLE_SAMPLE_BATCHES] += 1
        text = (
            f"{self.describe()}: the batch holds a single example (input shape {list(shape)}), so every "
            "channel's mean and variance come from that one example and the output is normalized against "
            "itself. Train with more than one example per batch (DataLoader(batch_size > 1, "
            "drop_last=True)), or pass on_single_sample='ignore' if this is intended."
        )
        if self.policy.on_single_sample == "raise":
            raise DegenerateBatchError(text)
        if self.policy.on_single_sample == "warn":
            self.warn_once("single_sample", text)

    def degenerate(self, counters: torch.Tensor | None, shape: tuple, has_running_stats: bool) -> None:
        """One value per channel in training. Returns normally when the batch is
        to be normalized with the running statistics instead."""
        if self.policy.on_degenerate == "running_stats" and has_running_stats:
            if counters is not None:
                counters[Counter.DEGENERATE_BATCHES] += 1
            self.warn_once(
                "degenerate",
                f"{self.describe()}: a batch with one value per channel (input shape {list(shape)}) was "
                "normalized with the running statistics, which it did not update.",
            )
            return
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

    # -- device-detected hazards -------------------------------------------------
    def after_op(self, counters: torch.Tensor | None, shape: tuple, training: bool) -> None:
        """Acts on what the ops counted. Reads the counters at once on the CPU
        (or with sync=True); on CUDA it acts on the snapshot an earlier call
        took, if that copy has landed, so that no call waits on the device."""
        if counters is None or torch.compiler.is_compiling():
            return
        if counters.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # inside a CUDA graph the device-side guard acts alone; check() reports
        if not counters.is_cuda or self.policy.sync:
            self._act(counters.tolist(), shape, training)
            return
        if self._pending is not None:
            _, host, landed = self._snapshot
            if not landed.query():
                return  # still in flight: keep it; the counters are cumulative, so nothing is lost
            old_shape, old_training = self._pending
            self._pending = None
            self._act(host.tolist(), old_shape, old_training)
        if self._snapshot is None or self._snapshot[0] != counters.device:
            # An event records on its own device only: a module moved to another GPU gets a new one.
            self._snapshot = (counters.device, torch.empty(NUM_COUNTERS, dtype=torch.int64, pin_memory=True),
                              torch.cuda.Event())
        _, host, landed = self._snapshot
        host.copy_(counters, non_blocking=True)
        landed.record(torch.cuda.current_stream(counters.device))
        self._pending = (shape, training)

    def __getstate__(self) -> dict:
        # A snapshot in flight (a CUDA event) neither copies nor pickles:
        # deepcopy(model) and torch.save(model) drop it, as check() would read the counters anyway.
        return {**self.__dict__, "_pending": None, "_snapshot": None}

    def unreported_nonfinite(self, values: list[int]) -> bool:
        return values[Counter.NONFINITE_EVENTS] > self._reported_nonfinite

    def _act(self, values: list[int], shape: tuple, training: bool) -> None:
        if not self.unreported_nonfinite(values):
            return
        self._reported_nonfinite = values[Counter.NONFINITE_EVENTS]
        policy = self.policy.on_nonfinite
        if policy == "skip":
            return
        message = self.nonfinite_message(values, shape, training)
        if policy == "raise":
            raise NonFiniteError(message)
        self.warn_once("nonfinite", message + " (warned once; report(model) counts every event)")

    def nonfinite_message(self, values: list[int], shape: tuple | None, training: bool) -> str:
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
        if training:
            return (
                f"{self.describe()} at training step {values[Counter.BATCHES] - 1} (the "
                f"{_ordinal(values[Counter.BATCHES])} batch it saw){where}: non-finite values: {found}. "
                "The running statistics were not updated from this batch. NaN/Inf in the weight or bias "
                "usually means the optimizer diverged: lower the learning rate or clip gradients; NaN/Inf "
                "in the mean or variance means the input itself holds NaN/Inf or overflows its dtype. "
                "Pass on_nonfinite='skip' (or 'warn') to keep training and count such batches."
            )
        return (
            f"{self.describe()} in eval mode{where}: non-finite or invalid statistics: {found} "
            "(a variance counts when running_var + eps <= 0). The output is not trustworthy: reload the "
            "running statistics from a good checkpoint or recompute them in training mode."
        )


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclasses.dataclass
class Report:
    """Counters of every safe batch-norm module of a model; str() is a table."""

    rows: list[dict]

    def __str__(self) -> str:
        if not self.rows:
            return "no torch_safebn modules"
        columns = ["module", "class"] + [c.name.lower() for c in REPORTED]
        table = [columns] + [[str(row[c]) for c in columns] for row in self.rows]
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
    """Reads the counters of every torch_safebn module of `model` (one sync)."""
    pairs = list(_guarded_modules(model))
    rows = []
    for (module, state), (values, _) in zip(pairs, _snapshots([m for m, _ in pairs])):
        row = {"module": state.name or "(root)", "class": type(module).__name__}
        for counter in REPORTED:
            row[counter.name.lower()] = values[counter] if values is not None else "-"
        rows.append(row)
    return Report(rows)


def check(model: torch.nn.Module) -> None:
    """Raises NonFiniteError for the first module with on_nonfinite='raise'
    that either counted a non-finite event no forward has raised yet (on CUDA
    a forward raises one step late), or whose parameters or running
    statistics hold NaN/Inf now (say, after the optimizer's last step, which
    no forward has seen). Call it after training, or every few steps."""
    pairs = list(_guarded_modules(model))
    for (module, state), (values, nonfinite) in zip(pairs, _snapshots([m for m, _ in pairs])):
        if state.policy.on_nonfinite != "raise":
            continue
        if values is not None and state.unreported_nonfinite(values):
            state._reported_nonfinite = values[Counter.NONFINITE_EVENTS]
            raise NonFiniteError(state.nonfinite_message(values, None, module.training))
        if nonfinite:
            raise NonFiniteError(
                f"{state.describe()}: {', '.join(nonfinite)} hold NaN/Inf now. A non-finite weight or bias "
                "means the optimizer diverged since the last forward: lower the learning rate or clip "
                "gradients, and restart from the last good checkpoint."
            )
