"""batch_norm(): F.batch_norm's signature and numbers, plus the safety checks.

The one path from the modules to the ops: it validates the arguments, applies
the host-known policies (degenerate and single-example batches), calls the
ops, and hands what the ops counted to the module's SafetyState."""
from __future__ import annotations

import torch

from ._ops import OPS
from .safety import NUM_COUNTERS, Policy, SafetyState, validate_hyperparameters

__all__ = ["batch_norm"]


def _check_tensors(input, running_mean, running_var, weight, bias) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm expects a tensor input, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"batch_norm expects a floating-point input (float32, float64, float16 or bfloat16), got "
            f"{input.dtype}. Convert it with .float() first."
        )
    if not 2 <= input.dim() <= 5:
        raise ValueError(
            f"batch_norm expects an input of 2 to 5 dimensions (N, C, ...), got shape {list(input.shape)}"
        )
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(
                f"{name} has shape {list(t.shape)} but the input has {channels} channels (shape "
                f"{list(input.shape)}): expected [{channels}]. Check num_features against the input's dimension 1."
            )
        if t.device != input.device:
            raise ValueError(
                f"{name} is on {t.device} but the input is on {input.device}: move the module and the "
                "input to the same device."
            )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    state: SafetyState | None = None,
    on_degenerate: str = "raise",
    on_nonfinite: str = "raise",
    on_single_sample: str = "warn",
    checks: bool = True,
) -> torch.Tensor:
    """Batch normalization as F.batch_norm computes it, guarded.

    Called directly, the policy comes from the keyword options and errors are
    raised at once (the counters, if not given, are a temporary tensor, read
    back after the call). Modules pass their own `state` and `counters`
    instead, which carry the policy, the name and the counts across calls.
    momentum=None averages cumulatively and needs `num_batches_tracked`.
    """
    if state is None:
        policy = Policy(on_degenerate, on_nonfinite, on_single_sample, checks=checks, sync=True)
        state = SafetyState(policy, owner="batch_norm")
        if checks and counters is None:
            counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=input.device)
    validate_hyperparameters(eps, momentum)
    _check_tensors(input, running_mean, running_var, weight, bias)
    guarded = state.policy.checks
    counters = counters if guarded else None
    has_running_stats = running_mean is not None and running_var is not None
    if momentum is None and has_running_stats and num_batches_tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")

    if not training:
        if not has_running_stats:
            raise ValueError("running_mean and running_var must be given when training=False")
        if _wants_grad(input, weight, bias):
            output = OPS.forward_eval(input, weight, bias, running_mean, running_var, eps)
            if guarded:
                OPS.check_eval_stats(counters, running_mean, running_var, weight, bias, eps)
        else:
            output = OPS.forward_inference(input, weight, bias, running_mean, running_var, eps, counters)
        if guarded:
            state.after_op(counters, tuple(input.shape), training=False)
        return output

    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if count == 1:
        if not guarded:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        state.degenerate(counters, tuple(input.shape), has_running_stats)
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                          num_batches_tracked=num_batches_tracked, counters=counters, state=state)
    if guarded and input.shape[0] == 1 and count > 1:
        state.single_sample(counters, tuple(input.shape))

    output, mean, invstd = OPS.forward_train(input, weight, bias, eps)
    record_batch(mean, invstd, count, running_mean, running_var, weight, bias, momentum, eps,
                 num_batches_tracked=num_batches_tracked, counters=counters, state=state, shape=tuple(input.shape))
    return output


def record_batch(
    mean: torch.Tensor,
    invstd: torch.Tensor,
    count: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    *,
    num_batches_tracked: torch.Tensor | None,
    counters: torch.Tensor | None,
    state: SafetyState,
    shape: tuple,
) -> None:
    """After a training forward over `count` values per channel: the guarded
    running-statistics update (guarded when `counters` is given), then the
    policy's response to what it counted. Shared with SafeSyncBatchNorm."""
    has_running_stats = running_mean is not None and running_var is not None
    if count == 0:
        # An empty batch changes no buffer. Native still counts it in
        # num_batches_tracked, which checks=False reproduces.
        if counters is None and has_running_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    if has_running_stats or counters is not None:
        OPS.update_running_stats(
            running_mean, running_var, num_batches_tracked if has_running_stats else None, counters,
            mean, invstd, weight, bias, count, eps, momentum,
        )
        state.after_op(counters, shape, training=True)


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
