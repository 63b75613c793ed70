"""convert_model() and revert_model(): swap a model's batch norms for their
torch_safebn counterparts (and back), keeping parameters, buffers, device,
dtype, train/eval state, process group, and timm's activation and dropout.

What converts, by exact class (a subclass may compute something else in its
forward, so it is named in a warning instead):
  nn.BatchNorm1d/2d/3d        -> SafeBatchNorm1d/2d/3d
  nn.LazyBatchNorm1d/2d/3d    -> SafeLazyBatchNorm1d/2d/3d (SafeBatchNorm once materialized)
  nn.SyncBatchNorm            -> SafeSyncBatchNorm
  timm's BatchNormAct2d       -> SafeBatchNormAct2d
  timm's SyncBatchNormAct     -> SafeSyncBatchNormAct
timm stays optional: its classes are looked up only when timm has been imported."""
from __future__ import annotations

import collections
import dataclasses
import sys

from torch import nn

from .deployment import check_artifact
from .distributed import SafeSyncBatchNorm
from .modules import SAFE_FOR_NATIVE, _SafeBatchNormMixin
from .norm_act import SafeBatchNormAct2d, SafeSyncBatchNormAct
from .caller_warnings import warn_at_caller
from .errors import UnconvertedBatchNormError
from .policy import SAFETY_OPTIONS, Policy
from .report import name_modules, unguarded

__all__ = ["convert_model", "revert_model", "native_module"]

_LAZY = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def _timm_classes() -> dict[type, type]:
    """timm's batch norms with an activation, by their safe counterparts, if
    timm is imported: a model can hold timm's modules only then, and a model
    without them need not pay for timm's import (or fail with it)."""
    if sys.modules.get("timm") is None:
        return {}
    from timm.layers import norm_act

    return {norm_act.BatchNormAct2d: SafeBatchNormAct2d, norm_act.SyncBatchNormAct: SafeSyncBatchNormAct}


def _torchvision_classes() -> dict[type, type]:
    """torchvision's FrozenBatchNorm2d by its safe counterpart, if torchvision is imported."""
    if sys.modules.get("torchvision") is None:
        return {}
    from torchvision.ops.misc import FrozenBatchNorm2d

    from .frozen import SafeFrozenBatchNorm2d

    return {FrozenBatchNorm2d: SafeFrozenBatchNorm2d}


def _safe_for_native() -> dict[type, type]:
    return {**SAFE_FOR_NATIVE, nn.SyncBatchNorm: SafeSyncBatchNorm, **_timm_classes(), **_torchvision_classes()}


def _target(module: nn.Module, table: dict[type, type], distributed: bool) -> type | None:
    """The class `module` becomes, or None if it stays as it is."""
    cls = type(module)
    if distributed and cls in _LAZY:
        return None  # synchronized batch norms have no lazy form: run a forward first
    target = table.get(cls)
    # Frozen statistics have no group to synchronize with: they stay frozen.
    synchronizes = distributed and not _frozen(cls)
    if isinstance(module, _SafeBatchNormMixin):
        target = None  # converted before: it took the options already (_apply_options)
        if synchronizes and not isinstance(module, SafeSyncBatchNorm):
            target = SafeSyncBatchNormAct if isinstance(module, SafeBatchNormAct2d) else SafeSyncBatchNorm
    elif synchronizes and target is not None and not issubclass(target, SafeSyncBatchNorm):
        target = SafeSyncBatchNormAct if issubclass(target, SafeBatchNormAct2d) else SafeSyncBatchNorm
    return target


def _frozen(cls: type) -> bool:
    """torchvision's FrozenBatchNorm2d or its safe counterpart: batch norms without a training mode."""
    return not issubclass(cls, nn.modules.batchnorm._NormBase)


def _rebuild(module: nn.Module, cls: type, process_group=None, **options) -> nn.Module:
    """A `cls` with `module`'s configuration, the very tensors of its
    parameters and buffers (an optimizer built before keeps training them),
    its activation and dropout, and its train/eval state."""
    if isinstance(module, _SafeBatchNormMixin) and issubclass(cls, _SafeBatchNormMixin):
        options = dataclasses.asdict(module.policy)  # the options given now are applied already
    arguments = {}
    if getattr(module, "affine", False) and module.bias is None:  # torch's bias=False
        arguments["bias"] = False
    if issubclass(cls, (nn.SyncBatchNorm, SafeSyncBatchNorm)):
        # a synchronized module keeps its group unless another is given
        arguments["process_group"] = process_group if process_group is not None else getattr(
            module, "process_group", None)
    if issubclass(cls, (SafeBatchNormAct2d, SafeSyncBatchNormAct)):
        arguments["act"] = getattr(module, "act", None)
        arguments["drop"] = getattr(module, "drop", None)
    reference = next(iter(module.state_dict().values()), None)
    device = None if reference is None else reference.device
    if _frozen(cls):
        safe = issubclass(cls, _SafeBatchNormMixin)  # torchvision's takes neither a device nor options
        new = cls(module.weight.numel(), module.eps, **({"device": device, **options} if safe else {}))
    elif issubclass(cls, _LAZY):  # no num_features until the first input
        new = cls(module.eps, module.momentum, module.affine, module.track_running_stats, device=device,
                  **arguments, **options)
    else:
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  device=device, **arguments, **options)
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        if name in new._buffers:
            new._buffers[name] = buffer
    for name, child in module.named_children():  # timm's act and drop, when they moved over
        setattr(new, name, child)
    if getattr(module, "virtual_batch_size", None) and not isinstance(new, SafeSyncBatchNorm):
        new.virtual_batch_size = module.virtual_batch_size
    new.train(module.training)
    return new


def _swap(model: nn.Module, choose, skipped: collections.Counter, **options) -> nn.Module:
    cls = choose(model)
    if cls is not None:
        return _rebuild(model, cls, **options)
    if unguarded(model):
        skipped[type(model).__qualname__] += 1
    for name, child in model.named_children():
        setattr(model, name, _swap(child, choose, skipped, **options))
    return model


def _check_options(model: nn.Module, options: dict) -> None:
    """Refuses what the new or updated modules would refuse, before any changes."""
    unknown = set(options) - set(SAFETY_OPTIONS)
    if unknown:
        raise TypeError(f"convert_model got unknown option(s) {', '.join(map(repr, sorted(unknown)))}; the safety "
                        f"options are {', '.join(SAFETY_OPTIONS)}")
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


def convert_model(model: nn.Module, *, distributed: bool = False, process_group=None, strict: bool = False,
                  **options) -> nn.Module:
    """Replaces every batch norm of `model` (the model itself included) that
    torch_safebn can guard by its counterpart (see this module's docstring),
    in place, and returns the model. Keyword options (on_nonfinite="skip",
    ...; see SafeBatchNorm2d) go to every new module and to every
    torch_safebn module converted before.

    A batch norm it cannot guard (a subclass of nn.BatchNorm with a forward of
    its own, say) stays as it is, and a warning names each such class and how
    many; strict=True raises UnconvertedBatchNormError instead, before
    anything changes. report(model) lists the batch norms left unguarded.

    distributed=True makes every batch norm a SafeSyncBatchNorm (or
    SafeSyncBatchNormAct), whose statistics span the ranks of `process_group`
    (default: the whole world; an nn.SyncBatchNorm keeps its own), as
    nn.SyncBatchNorm.convert_sync_batchnorm does. (Not `sync=True`: that is
    the safety option that raises CUDA errors at once.)"""
    _check_options(model, options)
    table = _safe_for_native()

    def choose(module: nn.Module) -> type | None:
        return _target(module, table, distributed)

    if strict:
        unconverted = collections.Counter()
        _count_unconverted(model, choose, unconverted)
        if unconverted:
            raise UnconvertedBatchNormError(_unconverted_message(unconverted))
    _apply_options(model, options)
    skipped = collections.Counter()
    model = _swap(model, choose, skipped, process_group=process_group, **options)
    if skipped:
        warn_at_caller(_unconverted_message(skipped) + " Pass strict=True to make this an error.")
    return name_modules(model)


def _count_unconverted(model: nn.Module, choose, counts: collections.Counter) -> None:
    """What _swap would count in `skipped`, without changing the model."""
    if choose(model) is not None:
        return
    if unguarded(model):
        counts[type(model).__qualname__] += 1
    for child in model.children():
        _count_unconverted(child, choose, counts)


def _unconverted_message(counts: collections.Counter) -> str:
    found = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
    return (f"convert_model left batch norms unguarded: {found}. torch_safebn converts torch's batch norms and "
            "timm's BatchNormAct2d by their exact class, since a subclass may compute something else in its "
            "forward; replace these modules yourself, or subclass a torch_safebn module instead.")


def revert_model(model: nn.Module, *, check: bool = True) -> nn.Module:
    """Replaces every torch_safebn batch norm by the class convert_model made
    it from (timm's for SafeBatchNormAct2d, which needs timm imported), for
    tools that know native's classes only (README, "Deploying a converted
    model"). The native modules run unguarded, so first every running
    statistic, weight and bias is checked: NaN/Inf, or running_var + eps <=
    0, raises NonFiniteError naming the layer, and nothing changes;
    check=False skips that (to inspect a broken checkpoint, say)."""
    if check:
        name_modules(model)
        for module in model.modules():
            if isinstance(module, _SafeBatchNormMixin):
                check_artifact(module, "revert it to its native class")
    table = {safe: native for native, safe in _safe_for_native().items()}
    unknown = collections.Counter()

    def choose(module: nn.Module) -> type | None:
        if isinstance(module, _SafeBatchNormMixin) and type(module) not in table:
            unknown[type(module).__qualname__] += 1
        return table.get(type(module))

    model = _swap(model, choose, collections.Counter())
    if unknown:
        kept = ", ".join(f"{count} {name}" for name, count in sorted(unknown.items()))
        warn_at_caller(f"revert_model kept {kept}: their native class comes from timm, which is not imported: "
                       "import timm first.")
    return model


def native_module(module: nn.Module) -> nn.Module:
    """The class convert_model made `module` (a torch_safebn batch norm) from,
    as a new module sharing its parameters and buffers, for a tool that knows
    native's classes only; its statistics checked as revert_model checks them."""
    check_artifact(module, "hand it to a tool that knows native's classes only")
    native = {safe: native for native, safe in _safe_for_native().items()}[type(module)]
    return _rebuild(module, native)
