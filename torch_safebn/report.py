"""report() and check(): a model's counters read in one host transfer, and
the errors no forward raised yet; name_modules() names the modules in them."""
from __future__ import annotations

import dataclasses
import itertools
import sys

import torch

from .contract import NUM_COUNTERS, REPORTED, Counter
from .errors import NonFiniteError
from .state import SafetyState, unreported

__all__ = ["Report", "report", "check", "name_modules", "unguarded"]


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


def unguarded(module: torch.nn.Module) -> bool:
    """A batch norm torch_safebn does not guard: torch's (or a subclass of it),
    or torchvision's FrozenBatchNorm2d."""
    if isinstance(getattr(module, "safety_state", None), SafetyState):
        return False
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return True
    torchvision = sys.modules.get("torchvision")
    return torchvision is not None and isinstance(module, torchvision.ops.misc.FrozenBatchNorm2d)


def _guarded_modules(model: torch.nn.Module):
    name_modules(model)
    for module in model.modules():
        state = getattr(module, "safety_state", None)
        if isinstance(state, SafetyState):
            yield module, state


def name_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Gives every torch_safebn module its qualified name in `model` (e.g.
    'layer1.0.bn1') for errors, warnings and reports. convert_model() does
    this too."""
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
        if not isinstance(state, SafetyState) and not unguarded(module):
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
        if values is not None and unreported(values) > 0:
            module.safety_counters[Counter.REPORTED_EVENTS] = values[Counter.NONFINITE_EVENTS]
            raise NonFiniteError(state.nonfinite_message(values, None))
        if nonfinite:
            raise NonFiniteError(
                f"{state.describe()}: {', '.join(nonfinite)} hold NaN/Inf now. A non-finite weight or bias "
                "means the optimizer diverged since the last forward: lower the learning rate or clip "
                "gradients, and restart from the last good checkpoint."
            )
