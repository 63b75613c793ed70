"""Registration glue for the safebn ops: loads the compiled kernels (or
registers reference.py in their place), the fake kernels, and the Python
kernel of the observe op. Everything else calls the ops through OPS."""
from __future__ import annotations

import warnings

import torch

from . import reference, safety

# The schemas are declared once, in csrc/ops.cpp. These copies are used only
# when the extension cannot load; tests/test_ops.py checks that they agree.
SCHEMAS = {
    "forward_train": "(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, float? momentum, "
    "float eps, int activation=0, float activation_param=0.) -> (Tensor output, Tensor mean, Tensor invstd)",
    "batch_norm_train": "(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, float? momentum, "
    "float eps, int activation=0, float activation_param=0.) -> Tensor",
    "batch_norm_eval": "(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
    "Tensor(a!)? counters, float eps, int activation=0, float activation_param=0.) -> Tensor",
    "backward": "(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
    "bool train, bool[3] output_mask, int activation=0, float activation_param=0.) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    "batch_stats": "(Tensor input) -> (Tensor mean, Tensor var)",
    "normalize": "(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor",
    "backward_reduce": "(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)",
    "backward_elemt": "(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
    "Tensor sum_dy, Tensor sum_dy_xmu, SymInt count) -> Tensor",
    "update_running_stats": "(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, Tensor mean, Tensor invstd, "
    "Tensor? weight, Tensor? bias, SymInt count, float eps, float? momentum, bool single_sample=False) -> ()",
    "check_running_stats": "(Tensor(a!) counters, Tensor running_mean, Tensor running_var, Tensor? weight, "
    "Tensor? bias, float eps) -> ()",
    "observe": "(Tensor(a!) counters, int module, SymInt[] shape, int event) -> ()",
}
# Composites of other ops, which autograd, fake tensors and compilers see
# through (CompositeImplicitAutograd): batch_norm_train always, the
# reference's differentiable forwards when they stand in for the kernels.
_TRACED_THROUGH = ("forward_train", "batch_norm_eval", "batch_norm_train")
# Kernels written in Python for every device, extension or not.
_PYTHON_KERNELS = {"observe": safety.observe_kernel}


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
        _REFERENCE_LIBRARY.define(name + schema)
        if name not in _PYTHON_KERNELS:
            key = "CompositeImplicitAutograd" if name in _TRACED_THROUGH else "CompositeExplicitAutograd"
            _REFERENCE_LIBRARY.impl(name, getattr(reference, name), key)


BACKEND = _load_backend()
OPS = torch.ops.safebn
if BACKEND != "reference":
    from . import _C

    safety.SafetyState.events_pending = _C.events_pending
    if BACKEND == "cuda+cpu":
        safety.SafetyState.copy_to_host = _C.snapshot_counters

_PYTHON_KERNEL_LIBRARY = torch.library.Library("safebn", "IMPL")
for _name, _kernel in _PYTHON_KERNELS.items():
    _PYTHON_KERNEL_LIBRARY.impl(_name, _kernel, "CompositeExplicitAutograd")


# -- fake (meta) kernels: shapes and dtypes only -----------------------------------
def _channel_stats_like(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=reference.accumulate_dtype(input.dtype))


def _output_like(input: torch.Tensor) -> torch.Tensor:
    # The kernels keep contiguous, channels_last and channels_last_3d inputs'
    # layouts and make anything else contiguous.
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        dims = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt)
        if (dims is None or input.dim() == dims) and input.is_contiguous(memory_format=fmt):
            return torch.empty_like(input, memory_format=fmt)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _check_devices(input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """What the device kernels check first, for a call that mixes devices
    and so lands here (a meta tensor among CPU ones, say)."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {input.device}. Move the module and the "
                             "input to the same device.")


def _register_fake(name: str):
    """register_fake, except for the reference's composite forwards, which
    fake tensors trace through."""
    if BACKEND == "reference" and name in _TRACED_THROUGH:
        return lambda fake: fake
    return torch.library.register_fake(f"safebn::{name}")


@_register_fake("forward_train")
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps, activation=0,
      activation_param=0.0):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked, counters=counters)
    return _output_like(input), _channel_stats_like(input), _channel_stats_like(input)


@_register_fake("batch_norm_eval")
def _(input, weight, bias, running_mean, running_var, counters, eps, activation=0, activation_param=0.0):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   counters=counters)
    return _output_like(input)


@_register_fake("backward")
def _(grad_output, input, weight, bias, mean, invstd, train, output_mask, activation=0, activation_param=0.0):
    grad_input = _output_like(input) if output_mask[0] else None
    grad_weight = torch.empty_like(weight) if weight is not None and output_mask[1] else None
    # without a weight the bias gradient comes in the statistics' dtype
    grad_bias = (torch.empty_like(weight) if weight is not None else _channel_stats_like(input)) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


@_register_fake("batch_stats")
def _(input):
    return _channel_stats_like(input), _channel_stats_like(input)


@_register_fake("normalize")
def _(input, weight, bias, mean, invstd):
    return _output_like(input)


@_register_fake("backward_reduce")
def _(grad_output, input, mean):
    return _channel_stats_like(input), _channel_stats_like(input)


@_register_fake("backward_elemt")
def _(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    return _output_like(input)


@_register_fake("update_running_stats")
def _(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count, eps, momentum,
      single_sample=False):
    return None


@_register_fake("check_running_stats")
def _(counters, running_mean, running_var, weight, bias, eps):
    return None


@_register_fake("observe")
def _(counters, module, shape, event):
    return None
