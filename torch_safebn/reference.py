"""Pure-PyTorch batch norm: the oracle of the tests and the fallback when the
compiled extension cannot load. It implements each safebn op with the same
signature and the same guard rules, in composite (differentiable) ops, and
computes in float64 when given float64."""
from __future__ import annotations

import torch

from .activations import reference_activation, reference_derivative
from .safety import Counter

__all__ = [
    "accumulate_dtype",
    "values_per_channel",
    "check_running_stats",
    "forward_train",
    "batch_norm_train",
    "batch_norm_eval",
    "backward",
    "batch_stats",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "update_running_stats",
]


def values_per_channel(input: torch.Tensor) -> int:
    """The values a channel's statistics are computed over: N times the spatial size."""
    return input.numel() // input.shape[1] if input.shape[1] else 0


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (float16 and bfloat16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: torch.Tensor | None, x: torch.Tensor, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel tensor shaped to broadcast against x: [1, C, 1, ...]."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if t is None:
        return torch.full(shape, fill, dtype=dtype, device=x.device)
    return t.to(dtype).reshape(shape)


def batch_stats(input):
    acc = accumulate_dtype(input.dtype)
    x = input.to(acc)
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, var


def _normalized(input, weight, bias, mean, invstd):
    """z = (x - mean) * invstd * weight + bias, in the accumulation dtype."""
    acc = accumulate_dtype(input.dtype)
    x = input.to(acc)
    scale = _per_channel(invstd, x, 1, acc) * _per_channel(weight, x, 1, acc)
    return (x - _per_channel(mean, x, 0, acc)) * scale + _per_channel(bias, x, 0, acc)


def normalize(input, weight, bias, mean, invstd):
    return _normalized(input, weight, bias, mean, invstd).to(input.dtype)


def _normalize_activate(input, weight, bias, mean, invstd, activation, activation_param):
    z = _normalized(input, weight, bias, mean, invstd)
    return reference_activation(z, activation, activation_param).to(input.dtype)


def _forward_train(input, weight, bias, eps, activation, activation_param):
    mean, var = batch_stats(input)
    invstd = torch.rsqrt(var + eps)
    return _normalize_activate(input, weight, bias, mean, invstd, activation, activation_param), mean, invstd


def _forward_eval(input, weight, bias, running_mean, running_var, eps, activation, activation_param):
    acc = accumulate_dtype(input.dtype)
    return _normalize_activate(input, weight, bias, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps),
                               activation, activation_param)


def backward_reduce(grad_output, input, mean):
    acc = accumulate_dtype(input.dtype)
    x, dy = input.to(acc), grad_output.to(acc)
    dims = _reduce_dims(x)
    return dy.sum(dims), (dy * (x - _per_channel(mean, x, 0, acc))).sum(dims)


def _grad_input(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, train):
    acc = accumulate_dtype(input.dtype)
    x, dy = input.to(acc), grad_output.to(acc)
    inv = _per_channel(invstd, x, 1, acc)
    if train:
        proj = _per_channel(sum_dy_xmu, x, 0, acc) * inv * inv / count
        dy = dy - _per_channel(sum_dy, x, 0, acc) / count - (x - _per_channel(mean, x, 0, acc)) * proj
    return (dy * inv * _per_channel(weight, x, 1, acc)).to(input.dtype)


def backward_elemt(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    return _grad_input(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, True)


def backward(grad_output, input, weight, bias, mean, invstd, train, output_mask, activation=0, activation_param=0.0):
    if activation:  # the gradient with respect to the output before the activation, from z recomputed
        z = _normalized(input, weight, bias, mean, invstd)
        grad_output = (grad_output.to(z.dtype) * reference_derivative(z, activation, activation_param)).to(input.dtype)
    sum_dy, sum_dy_xmu = backward_reduce(grad_output, input, mean)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        count = input.numel() // max(input.shape[1], 1)
        grad_input = _grad_input(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, train)
    param_dtype = sum_dy.dtype if weight is None else weight.dtype  # F.batch_norm takes a bias alone
    if weight is not None and output_mask[1]:
        empty = input.numel() == 0  # then zero, not 0 * NaN
        grad_weight = (sum_dy_xmu if empty else sum_dy_xmu * invstd.to(sum_dy_xmu.dtype)).to(param_dtype)
    if output_mask[2]:
        grad_bias = sum_dy.to(param_dtype)
    return grad_input, grad_weight, grad_bias


def _faults(mean, var_ok, weight, bias):
    """Channels at fault: (mean, var, weight, bias) as int64 scalars on the device."""

    def bad(t):
        if t is None:
            return torch.zeros((), dtype=torch.int64, device=mean.device)
        return (~torch.isfinite(t)).sum()

    return bad(mean), (~var_ok).sum(), bad(weight), bad(bias)


def _record_nonfinite(counters, faults, happened, training):
    """Adds one non-finite event where `happened`, and describes it when it is
    the first one not reported yet (csrc/guard.h), with no host synchronization."""
    describe = happened & (counters[Counter.NONFINITE_EVENTS] == counters[Counter.REPORTED_EVENTS])
    step = counters[Counter.BATCHES] - 1 if training else counters[Counter.BATCHES]
    counters[Counter.EVENT_STEP] = torch.where(describe, step, counters[Counter.EVENT_STEP])
    counters[Counter.EVENT_IN_TRAINING] = torch.where(describe, int(training), counters[Counter.EVENT_IN_TRAINING])
    for slot, count in zip(
        (Counter.BAD_MEAN_CHANNELS, Counter.BAD_VAR_CHANNELS, Counter.BAD_WEIGHT_CHANNELS, Counter.BAD_BIAS_CHANNELS),
        faults,
    ):
        counters[slot] = torch.where(describe, count, counters[slot])
    counters[Counter.NONFINITE_EVENTS] += happened.long()


def _update(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count, eps, momentum,
            single_sample):
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if momentum is None and num_batches_tracked is None and running_mean is not None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    guarded = counters is not None
    if count == 0:
        # An empty batch changes no buffer; native counts it in num_batches_tracked.
        if not guarded and running_mean is not None and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    if guarded:
        counters[Counter.BATCHES] += 1
        counters[Counter.SINGLE_SAMPLE_BATCHES] += int(single_sample)
        if count < 2:
            counters[Counter.SKIPPED_UPDATES] += 1
            return
    acc = mean.dtype
    var = (1.0 / (invstd * invstd) - eps).clamp_min(0)
    proceed = torch.ones((), dtype=torch.bool, device=mean.device)
    if guarded:
        var_ok = torch.isfinite(invstd) & (invstd > 0)
        faults = _faults(mean, var_ok, weight, bias)
        counters[Counter.LOW_VARIANCE_CHANNELS] += (var_ok & (var < eps)).sum()
        nonfinite = sum(faults) > 0
        _record_nonfinite(counters, faults, nonfinite, training=True)
        counters[Counter.SKIPPED_UPDATES] += nonfinite.long()
        proceed = ~nonfinite
    if running_mean is None:
        return
    # momentum as a Python float: a tensor made from it would be a host-to-device copy
    factor = 1.0 / (num_batches_tracked.to(acc) + 1) if momentum is None else momentum
    new_mean = (1 - factor) * running_mean.to(acc) + factor * mean
    new_var = (1 - factor) * running_var.to(acc) + factor * var * count / (count - 1)
    if guarded:
        limit = torch.finfo(running_mean.dtype).max
        fits = torch.isfinite(new_mean) & torch.isfinite(new_var) & (new_mean.abs() <= limit) & (new_var <= limit)
        overflow = proceed & ~fits.all()
        zero = torch.zeros((), dtype=torch.int64, device=mean.device)
        _record_nonfinite(counters, (zero, (~fits).sum(), zero, zero), overflow, training=True)
        counters[Counter.SKIPPED_UPDATES] += overflow.long()
        proceed = proceed & ~overflow
    running_mean.copy_(torch.where(proceed, new_mean, running_mean.to(acc)))
    running_var.copy_(torch.where(proceed, new_var, running_var.to(acc)))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(proceed.long())


def update_running_stats(
    running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count, eps, momentum,
    single_sample=False,
):
    _update(running_mean, running_var, num_batches_tracked, counters, mean, invstd, weight, bias, count, eps,
            momentum, single_sample=single_sample)


def forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                  activation=0, activation_param=0.0):
    output, mean, invstd = _forward_train(input, weight, bias, eps, activation, activation_param)
    mean, invstd = mean.detach(), invstd.detach()  # statistics, not differentiable outputs
    count = values_per_channel(input)
    with torch.no_grad():
        _update(running_mean, running_var, num_batches_tracked, counters, mean, invstd,
                None if weight is None else weight.detach(), None if bias is None else bias.detach(), count, eps,
                momentum, single_sample=input.shape[0] == 1 and count > 1)
    return output, mean, invstd


def batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                     activation=0, activation_param=0.0):
    return torch.ops.safebn.forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                          counters, momentum, eps, activation, activation_param)[0]


def check_running_stats(counters, running_mean, running_var, weight, bias, eps):
    """The eval call's check: one non-finite event where a running statistic,
    the weight or the bias is not finite (or the variance below -eps)."""
    with torch.no_grad():
        var = running_var.to(accumulate_dtype(running_var.dtype))
        var_ok = torch.isfinite(var) & (var + eps > 0)
        faults = _faults(running_mean, var_ok, weight, bias)
        _record_nonfinite(counters, faults, sum(faults) > 0, training=False)


def batch_norm_eval(input, weight, bias, running_mean, running_var, counters, eps, activation=0,
                    activation_param=0.0):
    output = _forward_eval(input, weight, bias, running_mean, running_var, eps, activation, activation_param)
    if counters is not None:
        check_running_stats(counters, running_mean, running_var, weight, bias, eps)
    return output
