"""The contract between the kernels and the Python layer, read from
contract.def and ops.def, the files the C++ code expands: the counters'
slots (Counter), the fused activations' codes (Activation), the ops'
schemas (SCHEMAS), and the dtype their statistics come in. Nothing here is
restated by hand."""
from __future__ import annotations

import enum
import re
from pathlib import Path

import torch

__all__ = ["Counter", "NUM_COUNTERS", "REPORTED", "Activation", "ACTIVATION_NAMES", "SCHEMAS", "accumulate_dtype",
           "values_per_channel"]


def _entries(kind: str, file: str = "contract.def") -> list[tuple[str, str]]:
    """(Name, text) of every SAFEBN_<kind>(Name, "text" ...) in `file`, the
    text being the macro's string literals joined, as C++ joins them."""
    source = re.sub(r"//[^\n]*", "", Path(__file__).with_name(file).read_text())
    found = re.findall(rf"SAFEBN_{kind}\(\s*(\w+)\s*,((?:\s*\"[^\"]*\")+)\s*\)", source)
    return [(name, "".join(re.findall(r"\"([^\"]*)\"", literals))) for name, literals in found]


def _constant_name(camel: str) -> str:
    """BadMeanChannels -> BAD_MEAN_CHANNELS, Relu6 -> RELU6."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


Counter = enum.IntEnum("Counter", [(_constant_name(name), slot) for slot, (name, _) in enumerate(_entries("COUNTER"))],
                       module=__name__)
Counter.__doc__ = "Slots of a module's int64 counters tensor (contract.def)."
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

Activation = enum.IntEnum("Activation",
                          [(_constant_name(name), code) for code, (name, _) in enumerate(_entries("ACTIVATION"))],
                          module=__name__)
Activation.__doc__ = "Codes of the ops' `activation` argument (contract.def)."
ACTIVATION_NAMES = {name: Activation(code) for code, (_, name) in enumerate(_entries("ACTIVATION"))}

SCHEMAS: dict[str, str] = dict(_entries("OP", "ops.def"))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics the ops compute and return: float64 for
    float64 input, float32 otherwise (float16 and bfloat16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def values_per_channel(input: torch.Tensor) -> int:
    """The values a channel's statistics are computed over: N times the
    spatial size (the ops' `count`; 0 without channels)."""
    return input.numel() // input.shape[1] if input.shape[1] else 0
