"""Fusing a converted model's batch norms into their convolutions and linear
layers with torch's own tools, which match native's classes exactly: the
configurations their public extension points take, in which every pattern
with a native batch norm also stands with its torch_safebn counterpart, and
whose fusers fold a batch norm only after checking its statistics (NaN/Inf,
or running_var + eps <= 0, raises NonFiniteError naming the layer), as
revert_model does. README, "Deploying a converted model", says tool by tool
which path each takes.

  torch.ao.quantization.fuse_modules(model, ..., fuse_custom_config_dict=fuse_custom_config())
  prepare_fx / prepare_qat_fx / convert_fx / fuse_fx(..., backend_config=backend_config())"""
from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn
from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, get_native_backend_config
from torch.ao.quantization.fuser_method_mappings import get_fuser_method

from .convert import native_module
from .modules import SAFE_FOR_NATIVE

__all__ = ["fuse_custom_config", "backend_config", "uses_safe_backend_config"]

# native batch norm class -> its torch_safebn counterpart, for the eager classes torch's fusers know
_SAFE = {native: safe for native, safe in SAFE_FOR_NATIVE.items() if native in (nn.BatchNorm1d, nn.BatchNorm2d,
                                                                                  nn.BatchNorm3d)}
# the patterns torch fuses a batch norm in, in eager mode
_EAGER_PATTERNS = [
    *((conv, bn) for conv, bn in ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
                                  (nn.ConvTranspose1d, nn.BatchNorm1d), (nn.ConvTranspose2d, nn.BatchNorm2d),
                                  (nn.ConvTranspose3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d))),
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
]


def _with_native_batch_norms(fuser: Callable) -> Callable:
    """A fuser method that hands `fuser` native batch norms in place of torch_safebn's, checked."""

    def fuse(is_qat: bool, *modules: nn.Module):
        return fuser(is_qat, *(native_module(m) if type(m) in _SAFE.values() else m for m in modules))

    fuse.__name__ = f"safe_{getattr(fuser, '__name__', 'fuser')}"
    return fuse


def _safe_pattern(pattern):
    """`pattern` with each native batch norm class replaced by its counterpart
    (patterns nest in reversed order in torch's complex format)."""
    if isinstance(pattern, tuple):
        return tuple(_safe_pattern(p) for p in pattern)
    return _SAFE.get(pattern, pattern)


def fuse_custom_config() -> dict:
    """The fuse_custom_config_dict that makes torch.ao.quantization.fuse_modules
    fuse torch_safebn's batch norms as native's: conv + bn (+ relu), linear + bn."""
    return {"additional_fuser_method_mapping": {
        _safe_pattern(pattern): _with_native_batch_norms(get_fuser_method(pattern)) for pattern in _EAGER_PATTERNS}}


def backend_config(base: BackendConfig | None = None) -> BackendConfig:
    """`base` (default: torch's native backend config) with every pattern that
    holds a native batch norm also for its torch_safebn counterpart: FX graph
    mode quantization (prepare_fx, prepare_qat_fx, convert_fx, fuse_fx) then
    folds or fuses them as it does native's."""
    base = base if base is not None else get_native_backend_config()
    config = BackendConfig(base.name + "+torch_safebn").set_backend_pattern_configs(base.configs)
    for pattern_config in base.configs:
        entries = pattern_config.to_dict()
        for key in ("pattern", "pattern_complex_format"):
            if key in entries:
                entries[key] = _safe_pattern(entries[key])
        if entries.get("pattern", entries.get("pattern_complex_format")) == _pattern_of(pattern_config):
            continue  # no batch norm in it
        if "fuser_method" in entries:
            entries["fuser_method"] = _with_native_batch_norms(entries["fuser_method"])
        config.set_backend_pattern_config(BackendPatternConfig.from_dict(entries))
    config.torch_safebn = True  # what the FX leaf looks for (modules._call_as_fx_leaf)
    return config


def _pattern_of(pattern_config: BackendPatternConfig):
    return pattern_config.pattern if pattern_config.pattern is not None else pattern_config._pattern_complex_format


def uses_safe_backend_config() -> bool:
    """Whether the FX graph mode quantization call tracing now was given
    backend_config(): torch's prepare takes it as an argument its tracer never sees."""
    frame = sys._getframe(1)
    while frame is not None:
        config = frame.f_locals.get("backend_config") if frame.f_code.co_name in ("_prepare_fx", "_fuse_fx") else None
        if isinstance(config, BackendConfig):
            return getattr(config, "torch_safebn", False)
        frame = frame.f_back
    return False

