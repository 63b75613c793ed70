"""Registration glue for the safebn ops: loads the compiled kernels (or
registers reference.py in their place), and registers the fake kernels and
autograd formulas beside them. Everything else calls the ops through OPS."""
from __future__ import annotations

import warnings

import torch

from . import reference

# The schemas are declared once, in csrc/ops.cpp. These copies are used only
# when the extension cannot load; tests/test_ops.py checks that they agree.
SCHEMAS = {
    "forward_train": "(Tensor input, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor output, Tensor mean, Tensor invstd)",
    "forward_eval": "(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
    "Tensor running_var, float eps) -> Tensor",
    "backward": "(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
    "bool train, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    "batch_stats": "(Tensor input) -> (Tensor mean, Tensor var)",
    "normalize": "(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor",
    "backward_reduce": "(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)",
    "backward_elemt": "(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
    "Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor",
    "update_running_stats": "(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? num_batches_tracked, Tensor(d!)? counters, Tensor mean, Tensor invstd, "
    "Tensor? weight, Tensor? bias, int count, float eps, float? momentum) -> ()",
    "check_eval_stats": "(Tensor(a!) counters, Tensor running_mean, Tensor running_var, "
    "Tensor? weight, Tensor? bias, float eps) -> ()",
    "forward_inference": "(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
    "Tensor running_var, float eps, Tensor(a!)? counters) -> Tensor",
}


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
        _REFERENCE_LIBRARY.impl(name, getattr(reference, name), "CompositeExplicitAutograd")


BACKEND = _load_backend()
OPS = torch.ops.safebn


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


@torch.library.register_fake("safebn::forward_train")
def _(input, weight, bias, eps):
    return _output_like(input), _channel_stats_like(input), _channel_stats_like(input)


@torch.library.register_fake("safebn::forward_eval")
def _(input, weight, bias, running_mean, running_var, eps):
    return _output_like(input)


@torch.library.register_fake("safebn::backward")
def _(grad_output, input, weight, mean, invstd, train, output_mask):
    grad_input = _output_like(input) if output_mask[0] else None
    grad_weight = torch.empty_like(weight) if weight is not None and output_mask[1] else None
    # without a weight the bias gradient comes in the statistics' dtype
    grad_bias = (torch.empty_like(weight) if weight is not None else _channel_stats_like(input)) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("safebn::batch_stats")
def _(input):
    return _channel_stats_like(input), _channel_stats_like(input)


@torch.library.register_fake("safebn::normalize")
def _(input, weight, bias, mean, invstd):
    return _output_like(input)


@torch.library.register_fake("safebn::backward_reduce")
def _(grad_output, input, mean):
    return _channel_stats_like(input), _channel_stats_like(input)


@torch.library.register_fake("safebn::backward_elemt")
def _(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    return _output_like(input)


@torch.library.register_fake("safebn::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count, eps, momentum):
    return None


@torch.library.register_fake("safebn::check_eval_stats")
def _(counters, running_mean, running_var, weight, bias, eps):
    return None


@torch.library.register_fake("safebn::forward_inference")
def _(input, weight, bias, running_mean, running_var, eps, counters):
    return _output_like(input)


# -- autograd ------------------------------------------------------------------------
def _double_backward_grads(ctx, grad_output, forward):
    """Gradients as a differentiable graph (backward with create_graph=True):
    the reference forward is recomputed and differentiated, so that second
    derivatives see the batch statistics' dependence on the input."""
    input, weight, bias = ctx.saved_tensors[:3]
    wanted = [t for t, need in zip((input, weight, bias), ctx.needs_input_grad[:3]) if need]
    with torch.enable_grad():
        output = forward(input, weight, bias)
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, eps = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, invstd)


def _train_backward(ctx, grad_output, _grad_mean, _grad_invstd):
    if grad_output is None:
        return None, None, None, None
    if torch.is_grad_enabled():
        grads = _double_backward_grads(
            ctx, grad_output, lambda x, w, b: reference.forward_train(x, w, b, ctx.eps)[0]
        )
        return (*grads, None)
    input, weight, _, mean, invstd = ctx.saved_tensors
    grads = OPS.backward(grad_output, input, weight, mean, invstd, True, list(ctx.needs_input_grad[:3]))
    return (*grads, None)


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(input, weight, bias, running_mean, running_var)
    ctx.eps = eps


def _eval_backward(ctx, grad_output):
    nothing = (None, None, None)
    if grad_output is None:
        return (None, None, None) + nothing
    input, weight, _, running_mean, running_var = ctx.saved_tensors
    if torch.is_grad_enabled():
        grads = _double_backward_grads(
            ctx, grad_output,
            lambda x, w, b: reference.forward_eval(x, w, b, running_mean, running_var, ctx.eps),
        )
        return grads + nothing
    acc = reference.accumulate_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
    grads = OPS.backward(
        grad_output, input, weight, running_mean.to(acc), invstd, False, list(ctx.needs_input_grad[:3])
    )
    return tuple(grads) + nothing


torch.library.register_autograd("safebn::forward_train", _train_backward, setup_context=_train_setup_context)
torch.library.register_autograd("safebn::forward_eval", _eval_backward, setup_context=_eval_setup_context)
