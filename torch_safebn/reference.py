"""Pure-PyTorch batch norm: the oracle of the tests and the fallback when the
compiled extension cannot load. It implements each safebn op with the same
signature and the same guard rules, in composite (differentiable) ops, and
computes in float64 when given float64."""
from __future__ import annotations

import torch

from .contract import Activation, Counter, accumulate_dtype, values_per_channel

__all__ = [
    "activation",
    "activation_derivative",
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
    "sync_batch_norm_train",
    "sync_batch_norm",
    "sync_normalize",
    "sync_batch_norm_backward",
]


def activation(z: torch.Tensor, activation: int, activation_param: float = 0.0) -> torch.Tensor:
    """act(z) in torch's functional forms (differentiable: the composite
    forwards below rely on it)."""
    functions = {
        Activation.IDENTITY: lambda t: t,
        Activation.RELU: torch.relu,
        Activation.RELU6: lambda t: torch.nn.functional.hardtanh(t, 0.0, 6.0),
        Activation.LEAKY_RELU: lambda t: torch.nn.functional.leaky_relu(t, activation_param),
        Activation.SILU: torch.nn.functional.silu,
        Activation.GELU: torch.nn.functional.gelu,
        Activation.GELU_TANH: lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        Activation.HARDSWISH: torch.nn.functional.hardswish,
    }
    return functions[Activation(activation)](z)


def activation_derivative(z: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    """act'(z), with torch's values at the kinks (csrc/activation.h)."""
    kind = Activation(kind)
    if kind == Activation.IDENTITY:
        return torch.ones_like(z)
    if kind == Activation.RELU:
        return (z > 0).to(z.dtype)
    if kind == Activation.RELU6:
        return ((z > 0) & (z < 6)).to(z.dtype)
    if kind == Activation.LEAKY_RELU:
        return torch.where(z > 0, 1.0, torch.full_like(z, param))  # a tensor: two scalars would give float32
    if kind == Activation.SILU:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if kind == Activation.GELU:
        return 0.5 * torch.erfc(-z * 0.5**0.5) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5
    if kind == Activation.GELU_TANH:
        inner = (2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)
        s = torch.sigmoid(2 * inner)
        return s + 2 * z * s * (1 - s) * (2 / torch.pi) ** 0.5 * (1 + 3 * 0.044715 * z * z)
    return torch.where(z <= -3, 0.0, torch.where(z >= 3, 1.0, z / 3 + 0.5)).to(z.dtype)  # hardswish


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


def _normalize_activate(input, weight, bias, mean, invstd, kind, param):
    return activation(_normalized(input, weight, bias, mean, invstd), kind, param).to(input.dtype)


def normalize(input, weight, bias, mean, invstd, activation=0, activation_param=0.0):
    return _normalize_activate(input, weight, bias, mean, invstd, activation, activation_param)


def _forward_train(input, weight, bias, eps, activation, activation_param):
    mean, var = batch_stats(input)
    invstd = torch.rsqrt(var + eps)
    return _normalize_activate(input, weight, bias, mean, invstd, activation, activation_param), mean, invstd


def _forward_eval(input, weight, bias, running_mean, running_var, eps, activation, activation_param):
    acc = accumulate_dtype(input.dtype)
    return _normalize_activate(input, weight, bias, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps),
                               activation, activation_param)


def _before_activation(grad_output, input, weight, bias, mean, invstd, kind, param):
    """The gradient with respect to the batch norm's output before the
    activation, from z recomputed."""
    if not kind:
        return grad_output
    z = _normalized(input, weight, bias, mean, invstd)
    return (grad_output.to(z.dtype) * activation_derivative(z, kind, param)).to(input.dtype)


def _grad_sums(grad_output, input, mean):
    """sum(dy) and sum(dy * (x - mean)) per channel, in the accumulation dtype."""
    acc = accumulate_dtype(input.dtype)
    x, dy = input.to(acc), grad_output.to(acc)
    dims = _reduce_dims(x)
    return dy.sum(dims), (dy * (x - _per_channel(mean, x, 0, acc))).sum(dims)


def _parameter_grads(input, weight, invstd, sum_dy, sum_dy_xmu, mask):
    """The weight's and the bias's gradients where `mask` (weight, bias) wants
    them, in the weight's dtype (F.batch_norm takes a bias alone: then the sums')."""
    param_dtype = sum_dy.dtype if weight is None else weight.dtype
    grad_weight = grad_bias = None
    if weight is not None and mask[0]:
        empty = input.numel() == 0  # then zero, not 0 * NaN
        grad_weight = (sum_dy_xmu if empty else sum_dy_xmu * invstd.to(sum_dy_xmu.dtype)).to(param_dtype)
    if mask[1]:
        grad_bias = sum_dy.to(param_dtype)
    return grad_weight, grad_bias


def backward_reduce(grad_output, input, mean, invstd, weight, bias, param_mask, activation=0, activation_param=0.0):
    grad_output = _before_activation(grad_output, input, weight, bias, mean, invstd, activation, activation_param)
    sum_dy, sum_dy_xmu = _grad_sums(grad_output, input, mean)
    return torch.stack([sum_dy, sum_dy_xmu]), *_parameter_grads(input, weight, invstd, sum_dy, sum_dy_xmu, param_mask)


def _grad_input(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, train):
    acc = accumulate_dtype(input.dtype)
    x, dy = input.to(acc), grad_output.to(acc)
    inv = _per_channel(invstd, x, 1, acc)
    if train:
        proj = _per_channel(sum_dy_xmu, x, 0, acc) * inv * inv / count
        dy = dy - _per_channel(sum_dy, x, 0, acc) / count - (x - _per_channel(mean, x, 0, acc)) * proj
    return (dy * inv * _per_channel(weight, x, 1, acc)).to(input.dtype)


def backward_elemt(grad_output, input, weight, mean, invstd, sums, count, bias=None, activation=0,
                   activation_param=0.0):
    grad_output = _before_activation(grad_output, input, weight, bias, mean, invstd, activation, activation_param)
    return _grad_input(grad_output, input, weight, mean, invstd, sums[0], sums[1], count, True)


def _chunks(t, virtual_batch_size):
    """A ghost batch norm's chunks of `t` along N (one chunk without)."""
    return list(t.split(virtual_batch_size)) if virtual_batch_size > 0 and t.shape[0] else [t]


def backward(grad_output, input, weight, bias, mean, invstd, train, output_mask, activation=0, activation_param=0.0,
             virtual_batch_size=0):
    if virtual_batch_size > 0:  # each chunk with its statistics; the parameters' gradients summed
        parts = [backward(dy, x, weight, bias, m, i, train, output_mask, activation, activation_param)
                 for dy, x, m, i in zip(_chunks(grad_output, virtual_batch_size), _chunks(input, virtual_batch_size),
                                        mean, invstd)]
        grad_input = torch.cat([p[0] for p in parts]) if output_mask[0] else None
        return (grad_input, *(sum(p[k] for p in parts) if parts[0][k] is not None else None for k in (1, 2)))
    grad_output = _before_activation(grad_output, input, weight, bias, mean, invstd, activation, activation_param)
    sum_dy, sum_dy_xmu = _grad_sums(grad_output, input, mean)
    grad_input = None
    if output_mask[0]:
        count = input.numel() // max(input.shape[1], 1)
        grad_input = _grad_input(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, train)
    return grad_input, *_parameter_grads(input, weight, invstd, sum_dy, sum_dy_xmu, output_mask[1:])


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
                  activation=0, activation_param=0.0, virtual_batch_size=0):
    parts = [_forward_train(x, weight, bias, eps, activation, activation_param)
             for x in _chunks(input, virtual_batch_size)]
    output = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    # statistics, not differentiable outputs; a ghost batch norm's per chunk
    mean, invstd = (torch.stack([p[k].detach() for p in parts]) if virtual_batch_size > 0 else parts[0][k].detach()
                    for k in (1, 2))
    count = values_per_channel(input)
    batch_mean, batch_invstd = mean, invstd
    if virtual_batch_size > 0 and count:  # the whole batch's statistics, for the update
        x = input.to(accumulate_dtype(input.dtype))
        var, batch_mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
        batch_invstd = torch.rsqrt(var + eps)
    with torch.no_grad():
        _update(running_mean, running_var, num_batches_tracked, counters, batch_mean.detach(), batch_invstd.detach(),
                None if weight is None else weight.detach(), None if bias is None else bias.detach(), count, eps,
                momentum, single_sample=input.shape[0] == 1 and count > 1)
    return output, mean, invstd


def batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                     activation=0, activation_param=0.0, virtual_batch_size=0):
    return torch.ops.safebn.forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                          counters, momentum, eps, activation, activation_param,
                                          virtual_batch_size)[0]


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


class _AllGather(torch.autograd.Function):
    """all_gather_into_tensor, differentiable: its gradient is the
    reduce-scatter (sum) of the output's. (torch 2.14's
    _c10d_functional_autograd.all_gather_into_tensor refuses a gloo input
    that requires grad: "A view was created in no_grad mode ...".)"""

    @staticmethod
    def forward(ctx, t, group_size, group_name):
        ctx.group = group_size, group_name
        ops = torch.ops._c10d_functional
        return ops.wait_tensor(ops.all_gather_into_tensor(t, group_size, group_name))

    @staticmethod
    def backward(ctx, grad):
        ops = torch.ops._c10d_functional
        return ops.wait_tensor(ops.reduce_scatter_tensor(grad.contiguous(), "sum", *ctx.group)), None, None


def _group_statistics(input, eps, group_name, group_size):
    """The process group's mean and invstd, differentiable: the all_gather's
    gradient is the gradients' reduce-scatter. (The ranks' check that they
    make the same forwards is the extension's.)"""
    count = values_per_channel(input)
    channels = input.shape[1]
    x = input.to(torch.float64)
    if count:
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    else:
        mean = var = torch.zeros(channels, dtype=torch.float64, device=input.device)
    head = torch.tensor([count, input.shape[0]], dtype=torch.float64, device=input.device)
    rows = _AllGather.apply(torch.cat([head, mean, var]), group_size, group_name).view(group_size, 2 * channels + 2)
    counts, means, variances = rows[:, :1], rows[:, 2:2 + channels], rows[:, 2 + channels:]
    finite = torch.isfinite(rows[:, 2:]).all(1, keepdim=True)
    group_batch = torch.cat([rows[:, :2].detach(), finite.double()], 1).long().cpu()
    share = counts / max(int(counts.sum()), 1)
    mean = (share * means).sum(0)
    var = (share * (variances + (means - mean) ** 2)).sum(0)
    acc = accumulate_dtype(input.dtype)
    return mean.to(acc), torch.rsqrt(var.to(acc) + eps), group_batch


def _degenerate_output(input, weight, bias, running_mean, running_var, counters, eps, activation, activation_param):
    if running_mean is not None:
        return batch_norm_eval(input, weight, bias, running_mean, running_var, counters, eps, activation,
                               activation_param)
    return torch.zeros_like(input)


def sync_batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                          group_name, group_size, module, name=0, degenerate_uses_running_stats=False,
                          refuse_single_sample=False, activation=0, activation_param=0.0):
    mean, invstd, group_batch = _group_statistics(input, eps, group_name, group_size)
    count, examples = (int(v) for v in group_batch[:, :2].sum(0))
    if count == 1:
        uses_running_stats = degenerate_uses_running_stats and running_mean is not None
        output = _degenerate_output(input, weight, bias, running_mean if uses_running_stats else None, running_var,
                                    counters, eps, activation, activation_param)
        return output, mean, invstd, group_batch
    single_sample = examples == 1 and count > 1
    if not (single_sample and refuse_single_sample):
        with torch.no_grad():
            _update(running_mean, running_var, num_batches_tracked, counters, mean.detach(), invstd.detach(),
                    None if weight is None else weight.detach(), None if bias is None else bias.detach(), count, eps,
                    momentum, single_sample)
    output = _normalize_activate(input, weight, bias, mean, invstd, activation, activation_param)
    return output, mean, invstd, group_batch


def sync_batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                    group_name, group_size, module, name=0, degenerate_uses_running_stats=False,
                    refuse_single_sample=False, activation=0, activation_param=0.0):
    output, _, _, group_batch = sync_batch_norm_train(
        input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps, group_name,
        group_size, module, name, degenerate_uses_running_stats, refuse_single_sample, activation, activation_param)
    return output, group_batch


def sync_normalize(input, weight, bias, running_mean, running_var, mean, invstd, group_batch, eps, group_name,
                   activation=0, activation_param=0.0):
    if int(group_batch[:, 0].sum()) == 1:
        return _degenerate_output(input, weight, bias, running_mean, running_var, None, eps, activation,
                                  activation_param)
    return _normalize_activate(input, weight, bias, mean, invstd, activation, activation_param)


def sync_batch_norm_backward(grad_output, input, weight, bias, mean, invstd, group_batch, group_name, output_mask,
                             running_mean=None, running_var=None, eps=0.0, activation=0, activation_param=0.0):
    count = int(group_batch[:, 0].sum())
    if count == 1:
        acc = accumulate_dtype(input.dtype)
        return backward(grad_output, input, weight, bias, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps),
                        False, output_mask, activation, activation_param)
    sums, grad_weight, grad_bias = backward_reduce(grad_output, input, mean, invstd, weight, bias, output_mask[1:],
                                                   activation, activation_param)
    grad_input = None
    if output_mask[0]:
        sums = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(sums, "sum", group_name))
        grad_input = (backward_elemt(grad_output, input, weight, mean, invstd, sums, count, bias, activation,
                                     activation_param)
                      if values_per_channel(input) else torch.empty_like(input))
    return grad_input, grad_weight, grad_bias
