"""convert_model() and revert_model(): swap nn.BatchNorm* and nn.SyncBatchNorm
for their torch_safebn counterparts (and back) in a model tree, keeping
parameters, buffers, device, dtype, train/eval state and process group."""
from __future__ import annotations

import dataclasses

from torch import nn

from .distributed import SafeSyncBatchNorm
from .modules import SAFE_FOR_NATIVE, _SafeBatchNormMixin
from .safety import Policy, name_modules

__all__ = ["convert_model", "revert_model"]

_SAFE_FOR_NATIVE = {**SAFE_FOR_NATIVE, nn.SyncBatchNorm: SafeSyncBatchNorm}
_NATIVE_FOR_SAFE = {safe: native for native, safe in _SAFE_FOR_NATIVE.items()}


def _rebuild(module: nn.Module, cls: type, process_group=None, **options) -> nn.Module:
    if isinstance(module, _SafeBatchNormMixin) and issubclass(cls, _SafeBatchNormMixin):
        options = dataclasses.asdict(module.policy)  # the options given now are applied already
    native_options = {}
    if module.affine and module.bias is None:  # torch's bias=False
        native_options["bias"] = False
    if issubclass(cls, (nn.SyncBatchNorm, SafeSyncBatchNorm)):
        # a synchronized module keeps its group unless another is given
        own_group = getattr(module, "process_group", None)
        native_options["process_group"] = process_group if process_group is not None else own_group
    reference = next(iter(module.state_dict().values()), None)
    new = cls(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        device=None if reference is None else reference.device, **native_options, **options,
    )
    # The very parameter and buffer tensors move over, not copies: an optimizer
    # built before the conversion keeps updating them.
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        if name in new._buffers:
            new._buffers[name] = buffer
    new.train(module.training)
    return new


def _swap(model: nn.Module, table: dict, **options) -> nn.Module:
    if type(model) in table:
        return _rebuild(model, table[type(model)], **options)
    for name, child in model.named_children():
        setattr(model, name, _swap(child, table, **options))
    return model


def _check_options(model: nn.Module, options: dict) -> None:
    """Refuses what the new or updated modules would refuse, before any changes."""
    unknown = set(options) - {f.name for f in dataclasses.fields(Policy)}
    if unknown:
        raise TypeError(f"convert_model got unknown option(s) {', '.join(map(repr, sorted(unknown)))}; the safety "
                        f"options are {', '.join(f.name for f in dataclasses.fields(Policy))}")
    Policy(**options)  # the values
    if options.get("freeze_stats"):
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and not module.track_running_stats:
                raise ValueError(f"freeze_stats=True needs track_running_stats=True, which '{name or 'the model'}' "
                                 "does not have: there are no running statistics to use")


def _apply_options(model: nn.Module, options: dict) -> None:
    """Modules converted before take the options given now."""
    if options:
        for module in model.modules():
            if isinstance(module, _SafeBatchNormMixin):
                module.set_policy(dataclasses.replace(module.policy, **options))


def convert_model(model: nn.Module, *, distributed: bool = False, process_group=None, **options) -> nn.Module:
    """Replaces every nn.BatchNorm1d/2d/3d in `model` (the model itself
    included) by its SafeBatchNorm counterpart and every nn.SyncBatchNorm by a
    SafeSyncBatchNorm, in place, and returns the model. Keyword options
    (on_nonfinite="skip", ...; see SafeBatchNorm2d) go to every new module and
    to every torch_safebn module converted before.

    distributed=True makes every batch norm a SafeSyncBatchNorm, whose
    statistics span the ranks of `process_group` (default: the whole world;
    an nn.SyncBatchNorm keeps its own), as nn.SyncBatchNorm.convert_sync_batchnorm
    does for nn.SyncBatchNorm. (Not `sync=True`: that is the safety option
    that raises CUDA errors at once, and it goes to every module.)"""
    _check_options(model, options)
    _apply_options(model, options)
    table = _SAFE_FOR_NATIVE
    if distributed:  # SafeBatchNorm converted before becomes synchronized too
        table = dict.fromkeys([*_SAFE_FOR_NATIVE, *SAFE_FOR_NATIVE.values()], SafeSyncBatchNorm)
    return name_modules(_swap(model, table, process_group=process_group, **options))


def revert_model(model: nn.Module) -> nn.Module:
    """Replaces every SafeBatchNorm1d/2d/3d by the plain nn.BatchNorm class,
    and every SafeSyncBatchNorm by an nn.SyncBatchNorm of the same group."""
    return _swap(model, _NATIVE_FOR_SAFE)
