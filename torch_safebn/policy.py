"""What a module does about each hazard (Policy, DESIGN.md "Safety
semantics"), and the validation of the arguments that come with it."""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

__all__ = ["Policy", "SAFETY_OPTIONS", "validate_eps", "validate_momentum"]

_CHOICES = {
    "on_degenerate": ("raise", "running_stats"),
    "on_nonfinite": ("raise", "warn", "skip"),
    "on_single_sample": ("warn", "ignore", "raise"),
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """The safety options of a module; see SafeBatchNorm2d."""

    on_degenerate: str = "raise"
    on_nonfinite: str = "raise"
    on_single_sample: str = "warn"
    freeze_stats: bool = False
    checks: bool = True
    sync: bool = False
    checkpoint_aware: bool = True

    def __post_init__(self):
        for option, allowed in _CHOICES.items():
            value = getattr(self, option)
            if value not in allowed:
                raise ValueError(f"{option} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        for option in ("freeze_stats", "checks", "sync", "checkpoint_aware"):
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
            f"eps must be positive (a finite number > 0), got {eps!r}: it keeps 1/sqrt(var + eps) finite for a "
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
