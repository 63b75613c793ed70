"""batch_norm(): F.batch_norm's signature and numbers, plus the safety checks.

The one path from the modules to the ops. A call is one op (training: the
statistics, the output and the guarded update of every buffer; eval: the
output and the check of the running statistics), then the module's
SafetyState acts on what the op counted. What depends on the shape alone (a
batch of one example, one value per channel) is decided here, before the op.
In compiled code every host action goes through the safebn::observe op, so
that it happens at run time, in the step that saw it, as in eager code, and
the op is written in ATen ops that the compiler fuses (lowering.py)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import lowering
from ._ops import OPS
from .activations import activation_module, fused_activation
from .reference import values_per_channel
from .safety import NUM_COUNTERS, Event, Policy, SafetyState, validate_eps, validate_momentum

__all__ = ["batch_norm", "batch_norm_act"]

# The fused ops, looked up once: on the hot path each attribute costs.
_TRAIN, _EVAL = OPS.batch_norm_train.default, OPS.batch_norm_eval.default


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
    on_degenerate: str = "raise",
    on_nonfinite: str = "raise",
    on_single_sample: str = "warn",
    checks: bool = True,
) -> torch.Tensor:
    """Batch normalization as F.batch_norm computes it, guarded, with the
    policy of the keyword options (see SafeBatchNorm2d). Errors are raised in
    the call that saw the problem, on every device. momentum=None averages
    cumulatively over `num_batches_tracked`, which a training call then
    advances as the modules' buffer."""
    return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, act=None,
                          num_batches_tracked=num_batches_tracked, on_degenerate=on_degenerate,
                          on_nonfinite=on_nonfinite, on_single_sample=on_single_sample, checks=checks)


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    act: str | None = "relu",
    negative_slope: float = 0.01,
    num_batches_tracked: torch.Tensor | None = None,
    on_degenerate: str = "raise",
    on_nonfinite: str = "raise",
    on_single_sample: str = "warn",
    checks: bool = True,
) -> torch.Tensor:
    """act(batch_norm(...)), the activation fused into the batch norm's
    kernels: its name (relu, relu6, leaky_relu with `negative_slope`, silu,
    gelu, gelu_tanh, hardswish) or None. The rest as batch_norm()."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm expects a tensor input, got {type(input).__name__}")
    eps, momentum = validate_eps(eps), validate_momentum(momentum)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    fused = fused_activation(activation_module(act, negative_slope))
    if fused is None:
        raise ValueError(f"batch_norm_act fuses the activations named in torch_safebn.activations, not {act!r}: "
                         "apply it to batch_norm()'s output instead")
    kind, param = fused
    state = SafetyState(Policy(on_degenerate, on_nonfinite, on_single_sample, checks=checks, sync=True),
                        owner="batch_norm")
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=input.device) if checks else None
    return guarded_batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked, counters,
                              training, momentum, eps, state, int(kind), param)


def guarded_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    counters: torch.Tensor | None,
    use_batch_stats: bool,
    momentum: float | None,
    eps: float,
    state: SafetyState,
    activation: int = 0,
    activation_param: float = 0.0,
) -> torch.Tensor:
    """The modules' forward below the module: arguments validated already,
    `counters` None when checks are off. Normalizes with the batch's
    statistics and updates the running ones (when given) if
    `use_batch_stats`, else normalizes with the running statistics; then
    applies the fused activation (activations.Activation, 0: none)."""
    compiling = torch.compiler.is_compiling()
    if compiling and lowering.lowers(input):  # in ATen ops, which inductor fuses with their neighbours
        train, evaluate = lowering.batch_norm_train, lowering.batch_norm_eval
    else:
        train, evaluate = _TRAIN, _EVAL
    # The activation's arguments only where there is one: a plain call parses two fewer.
    fused = (activation, activation_param) if activation else ()
    if not use_batch_stats:
        output = evaluate(input, weight, bias, running_mean, running_var, counters, eps, *fused)
        if counters is not None:  # the hot path, spelled out: a Python call costs here
            if compiling:
                _observe(state, counters, input, Event.EVAL_CALL, compiling)
            else:
                state.after_op(counters, input, training=False)
        return output
    if input.shape[0] == 1:
        if values_per_channel(input) == 1:
            if counters is None:  # checks=False: native's error
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {input.size()}")
            if state.policy.on_degenerate == "running_stats" and running_mean is not None:
                _observe(state, counters, input, Event.DEGENERATE_HANDLED, compiling)
                return evaluate(input, weight, bias, running_mean, running_var, counters, eps, *fused)
            _observe(state, counters, input, Event.DEGENERATE_REFUSED, compiling)
        elif counters is not None and state.policy.on_single_sample != "ignore":
            _observe(state, counters, input, Event.SINGLE_SAMPLE, compiling)
    output = train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                   *fused)
    if counters is not None:
        if compiling:
            _observe(state, counters, input, Event.TRAINING_BATCH, compiling)
        else:
            state.after_op(counters, input, training=True)
    return output


def _observe(state: SafetyState, counters: torch.Tensor, input: torch.Tensor, event: Event, compiling: bool) -> None:
    """state.observe now, or, in compiled code, the op that calls it at run
    time. An exported program has no module to act for: its buffers stay
    guarded by the ops, and report() of the exporting model reads its counters."""
    if not compiling:
        state.observe(counters, input.shape, event)
    elif not torch.compiler.is_exporting():
        OPS.observe.default(counters, state.id, list(input.shape), int(event))
