"""convert_model() and revert_model(): swap nn.BatchNorm* for SafeBatchNorm*
(and back) in a model tree, keeping parameters, buffers, device, dtype and
train/eval state."""
from __future__ import annotations

from torch import nn

from .modules import SAFE_FOR_NATIVE
from .safety import name_modules

__all__ = ["convert_model", "revert_model"]

_NATIVE_FOR_SAFE = {safe: native for native, safe in SAFE_FOR_NATIVE.items()}


def _rebuild(module: nn.Module, cls: type, **options) -> nn.Module:
    native_options = {}
    if module.affine and module.bias is None:  # torch's bias=False
        native_options["bias"] = False
    reference = next(iter(module.state_dict().values()), None)
    new = cls(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        device=None if reference is None else reference.device,
        dtype=None if module.weight is None else module.weight.dtype,
        **native_options, **options,
    )
    if module.running_mean is not None and module.weight is None:
        # without parameters the buffers' dtype is the only dtype to follow
        new.running_mean.data = new.running_mean.data.to(module.running_mean.dtype)
        new.running_var.data = new.running_var.data.to(module.running_var.dtype)
    new.load_state_dict(module.state_dict(), strict=True)
    for name, param in module.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(param.requires_grad)
    new.train(module.training)
    return new


def _swap(model: nn.Module, table: dict, **options) -> nn.Module:
    if type(model) in table:
        return _rebuild(model, table[type(model)], **options)
    for name, child in model.named_children():
        setattr(model, name, _swap(child, table, **options))
    return model


def convert_model(model: nn.Module, **options) -> nn.Module:
    """Replaces every nn.BatchNorm1d/2d/3d in `model` (the model itself
    included) by its SafeBatchNorm counterpart, in place, and returns the
    model. Keyword options (on_nonfinite="skip", ...) go to every new module."""
    return name_modules(_swap(model, SAFE_FOR_NATIVE, **options))


def revert_model(model: nn.Module) -> nn.Module:
    """Replaces every SafeBatchNorm1d/2d/3d by the plain nn.BatchNorm class."""
    return _swap(model, _NATIVE_FOR_SAFE)
