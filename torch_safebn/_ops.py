"""Registration glue for the safebn ops: loads the compiled kernels (or
registers reference.py in their place), the fake kernels, and how the host
reads a module's counters. Everything else calls the ops through OPS."""
from __future__ import annotations

import warnings

import torch

from . import reference
from .contract import SCHEMAS, Counter, accumulate_dtype

__all__ = ["BACKEND", "OPS", "LIBRARY", "events_pending", "snapshot_counters", "group_totals", "group_statistics"]

# Composites of other ops, which autograd, fake tensors and compilers see
# through (CompositeImplicitAutograd): batch_norm_train and activation always,
# the reference's differentiable forwards when they stand in for the kernels.
_TRACED_THROUGH = ("forward_train", "batch_norm_eval", "batch_norm_train", "activation", "sync_batch_norm_train",
                   "sync_batch_norm", "sync_normalize")
# Kernels written in Python for every device, extension or not (state.py).
_PYTHON_KERNELS = ("observe",)


def _load_backend() -> str:
    from . import _extension

    problem = _extension.load()
    if problem is not None:
        warnings.warn(
            f"torch_safebn: {problem}. Meanwhile the pure-PyTorch reference implementation runs "
            "(correct, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        _register_reference()
        return "reference"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("safebn::forward_train", "CUDA")
    return "cuda+cpu" if has_cuda else "cpu"


def _register_reference() -> None:
    global _REFERENCE_LIBRARY
    _REFERENCE_LIBRARY = torch.library.Library("safebn", "DEF")
    for name, schema in SCHEMAS.items():
        _REFERENCE_LIBRARY.define(name + schema, tags=(torch.Tag.flexible_layout,))  # as csrc/ops.cpp
        if name not in _PYTHON_KERNELS:
            key = "CompositeImplicitAutograd" if name in _TRACED_THROUGH else "CompositeExplicitAutograd"
            _REFERENCE_LIBRARY.impl(name, getattr(reference, name), key)


BACKEND = _load_backend()
OPS = torch.ops.safebn
LIBRARY = torch.library.Library("safebn", "IMPL")  # the Python kernels' registrations

# How every guarded call reads its counters: whether CPU counters count a
# non-finite event not reported yet, and a CUDA snapshot into a pinned
# buffer. The extension's functions cost a fraction of the Tensor methods.
# Likewise the totals of a synchronized batch (group_batch: values per
# channel, examples, finite statistics by rank): values per channel and
# examples over the group, and whether every rank with values had finite
# statistics. And the group statistics a SafeSyncBatchNorm's eager forward
# kept in C++, which only the extension keeps (group_forward.py).
if BACKEND == "reference":
    def events_pending(counters: torch.Tensor) -> bool:
        return counters[Counter.NONFINITE_EVENTS].item() != counters[Counter.REPORTED_EVENTS].item()

    def snapshot_counters(counters: torch.Tensor, host: torch.Tensor) -> None:
        host.copy_(counters, non_blocking=True)

    def group_totals(group_batch: torch.Tensor) -> tuple[int, int, bool]:
        rows = group_batch.tolist()
        return (sum(row[0] for row in rows), sum(row[1] for row in rows),
                all(finite or not values for values, _, finite in rows))

    group_statistics = None
else:
    from . import _C

    events_pending = _C.events_pending
    snapshot_counters = getattr(_C, "snapshot_counters", None)
    group_totals = _C.group_totals
    group_statistics = _C.group_statistics


# -- fake (meta) kernels: shapes and dtypes only -----------------------------------
def _channel_stats_like(input: torch.Tensor, virtual_batch_size: int = 0) -> torch.Tensor:
    """[C], or a ghost batch norm's [chunks, C] (csrc/layout.h)."""
    shape = (input.shape[1],) if virtual_batch_size <= 0 else (-(-input.shape[0] // virtual_batch_size) or 1,
                                                               input.shape[1])
    return input.new_empty(shape, dtype=accumulate_dtype(input.dtype))


def _output_like(input: torch.Tensor) -> torch.Tensor:
    # The kernels keep contiguous, channels_last and channels_last_3d inputs'
    # layouts and make anything else contiguous.
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        dims = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt)
        if (dims is None or input.dim() == dims) and input.is_contiguous(memory_format=fmt):
            return torch.empty_like(input, memory_format=fmt)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _parameter_grads_like(input: torch.Tensor, weight: torch.Tensor | None, mask) -> tuple:
    """The weight's and the bias's gradients where `mask` (weight, bias) wants
    them: in the weight's dtype, the statistics' without a weight."""
    grad_weight = torch.empty_like(weight) if weight is not None and mask[0] else None
    grad_bias = (torch.empty_like(weight) if weight is not None else _channel_stats_like(input)) if mask[1] else None
    return grad_weight, grad_bias


def _check_devices(input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """What the device kernels check first, for a call that mixes devices
    and so lands here (a meta tensor among CPU ones, say)."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} is on {t.device} but the input is on {input.device}. Move the module and "
                               "the input to the same device.")


def _register_fake(name: str):
    """register_fake, except for the ops fake tensors trace through."""
    if name == "activation" or (BACKEND == "reference" and name in _TRACED_THROUGH):
        return lambda fake: fake
    return torch.library.register_fake(f"safebn::{name}")


@_register_fake("forward_train")
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps, activation=0,
      activation_param=0.0, virtual_batch_size=0):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked, counters=counters)
    stats = _channel_stats_like(input, virtual_batch_size)
    return _output_like(input), stats, torch.empty_like(stats)


@_register_fake("batch_norm_eval")
def _(input, weight, bias, running_mean, running_var, counters, eps, activation=0, activation_param=0.0):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   counters=counters)
    return _output_like(input)


@_register_fake("backward")
def _(grad_output, input, weight, bias, mean, invstd, train, output_mask, activation=0, activation_param=0.0,
      virtual_batch_size=0):
    return _output_like(input) if output_mask[0] else None, *_parameter_grads_like(input, weight, output_mask[1:])


@_register_fake("batch_stats")
def _(input):
    return _channel_stats_like(input), _channel_stats_like(input)


@_register_fake("normalize")
def _(input, weight, bias, mean, invstd, activation=0, activation_param=0.0):
    return _output_like(input)


@_register_fake("backward_reduce")
def _(grad_output, input, mean, invstd, weight, bias, param_mask, activation=0, activation_param=0.0):
    sums = input.new_empty((2, input.shape[1]), dtype=accumulate_dtype(input.dtype))
    return sums, *_parameter_grads_like(input, weight, param_mask)


@_register_fake("backward_elemt")
def _(grad_output, input, weight, mean, invstd, sums, count, bias=None, activation=0, activation_param=0.0):
    return _output_like(input)


@_register_fake("update_running_stats")
def _(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count, eps, momentum,
      single_sample=False):
    return None


@_register_fake("check_running_stats")
def _(counters, running_mean, running_var, weight, bias, eps):
    return None


@_register_fake("sync_batch_norm_train")
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps, group_name,
      group_size, module, name=0, degenerate_uses_running_stats=False, refuse_single_sample=False, activation=0,
      activation_param=0.0):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked, counters=counters)
    group_batch = torch.empty((group_size, 3), dtype=torch.int64, device="cpu")
    return _output_like(input), _channel_stats_like(input), _channel_stats_like(input), group_batch


@_register_fake("sync_normalize")
def _(input, weight, bias, running_mean, running_var, mean, invstd, group_batch, eps, group_name, activation=0,
      activation_param=0.0):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var, mean=mean,
                   invstd=invstd)
    return _output_like(input)


@_register_fake("sync_batch_norm_backward")
def _(grad_output, input, weight, bias, mean, invstd, group_batch, group_name, output_mask, running_mean=None,
      running_var=None, eps=0.0, activation=0, activation_param=0.0):
    return _output_like(input) if output_mask[0] else None, *_parameter_grads_like(input, weight, output_mask[1:])


@_register_fake("observe")
def _(counters, module, shape, event, group_batch=None, group=""):
    return None

