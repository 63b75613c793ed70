"""The one guarded forward, and batch_norm() / batch_norm_act(), its
functional form with F.batch_norm's signature.

Every batch norm of torch_safebn runs guarded_forward(): the modules, the
functional form, SafeSyncBatchNorm (whose statistics come from the process
group) and compiled code alike. A call decides what depends on the shape
alone (a batch of one example, one value per channel), runs one op
(training: the statistics, the output and the guarded update of every
buffer; eval: the output and the check of the running statistics), then the
module's SafetyState acts on what the op counted. Only that op differs with
the context:
  - eager: the fused kernels (safebn::batch_norm_train / batch_norm_eval);
  - the process group's statistics: safebn::sync_batch_norm_train (distributed.py);
  - compiled: ATen ops that inductor fuses with their neighbours, and the
    guard as an op, or the fused kernels where lowering.lowers measured them
    faster (lowering.py); every host action goes through the
    safebn::observe op, so that it happens at run time, in the step that saw it;
  - torch.func transforms: native's ops, and the guard on the plain values
    (transforms.py);
  - a deployment artifact (a trace, ONNX, an eval-mode export): native's ops
    alone, its safety checked once, when it is made (deployment.py)."""
from __future__ import annotations

import torch
from torch import nn

from . import deployment, lowering, transforms
from ._ops import OPS
from .activations import activation_module, fused_activation
from .contract import NUM_COUNTERS, values_per_channel
from .group_forward import sync_forward
from .policy import Policy, validate_eps, validate_momentum
from .state import Event, SafetyState

__all__ = ["batch_norm", "batch_norm_act", "guarded_forward", "fuses_activation"]

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
    if input.dim() < 2 and not input.numel():
        return input.clone()  # native's answer for an input with neither values nor channels
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode: pass running_mean and running_var, "
                           "or training=True")
    module = activation_module(act, negative_slope)
    fused = fused_activation(module)
    if fused is None:
        raise ValueError(f"batch_norm_act fuses the activations named in torch_safebn.activations, not {act!r}: "
                         "apply it to batch_norm()'s output instead")
    call = _FunctionalCall(weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                           Policy(on_degenerate, on_nonfinite, on_single_sample, checks=checks, sync=True),
                           input.device)
    if not fuses_activation():
        return module(guarded_forward(call, input))
    return guarded_forward(call, input, *fused)


class _FunctionalCall:
    """A functional call's arguments, as the attributes a module has."""

    track_running_stats = True
    virtual_batch_size = None

    def __init__(self, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                 policy: Policy, device):
        self.weight, self.bias = weight, bias
        self.running_mean, self.running_var, self.num_batches_tracked = running_mean, running_var, num_batches_tracked
        # as F.batch_norm, momentum matters (and is checked) in training only
        self.training, self.eps = training, validate_eps(eps)
        self.momentum = validate_momentum(momentum) if training else momentum
        self.safety_state = SafetyState(policy, owner="batch_norm")
        self.safety_counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device) if policy.checks else None


def fuses_activation() -> bool:
    """Whether a call now may fuse its activation into the batch norm: not in
    an artifact made for deployment, nor under torch.func transforms, where
    native's ops run and the activation stays the module it is."""
    return not (deployment.making_artifact() or transforms.active())


def guarded_forward(bn: nn.Module, input: torch.Tensor, activation: int = 0, activation_param: float = 0.0,
                    group=None) -> torch.Tensor:
    """The forward of every batch norm of torch_safebn. `bn` holds what a
    module holds (weight, bias, the running buffers, momentum, eps,
    safety_state, safety_counters, training, track_running_stats); the
    activation (activations.Activation, 0: none) is fused after the batch
    norm; `group`: the name and size of a process group whose statistics a
    training call takes."""
    state = bn.safety_state
    policy = state.policy
    training = bn.training and not policy.freeze_stats
    running_mean, running_var, num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    if training and not bn.track_running_stats:
        # As nn.BatchNorm: buffers that training does not track stay as they are.
        running_mean = running_var = num_batches_tracked = None
    if deployment.making_artifact():
        return deployment.forward(bn, input, training)
    if transforms.active():
        return transforms.forward(bn, input, training, running_mean, running_var, num_batches_tracked)
    counters = bn.safety_counters
    weight, bias, eps = bn.weight, bn.bias, bn.eps
    compiling = torch.compiler.is_compiling()
    # The activation's arguments only where there is one: a plain call parses two fewer.
    fused = (activation, activation_param) if activation else ()
    lowered = compiling and lowering.lowers(input, activation)
    evaluate = lowering.batch_norm_eval if lowered else _EVAL

    if not (training or running_mean is None):
        if lowered and counters is not None:  # the host action before the normalization (lowering.py)
            return evaluate(input, weight, bias, running_mean, running_var, counters, eps, *fused,
                            observe=lambda: _observe(state, counters, input, Event.EVAL_CALL, compiling))
        output = evaluate(input, weight, bias, running_mean, running_var, counters, eps, *fused)
        if counters is not None:  # the hot path, spelled out: a Python call costs here
            if compiling:
                _observe(state, counters, input, Event.EVAL_CALL, compiling)
            else:
                state.after_op(counters, input, training=False)
        return output
    # A recomputation (activation checkpointing runs the forward again inside
    # the backward) normalizes as the first pass did and updates and counts nothing.
    recomputing = not compiling and policy.checkpoint_aware and torch._C._current_graph_task_id() != -1
    if group is not None:
        return sync_forward(bn, input, weight, bias, (running_mean, running_var, num_batches_tracked), counters,
                            group, compiling, recomputing, *fused)
    # A ghost batch norm normalizes chunks of virtual_batch_size examples, each
    # with its own statistics: the op takes it after the activation's arguments.
    chunk = bn.virtual_batch_size
    train = lowering.batch_norm_train if lowered and not chunk else _TRAIN
    chunked = (activation, activation_param, chunk) if chunk else fused
    # The decisions about the smallest batch normalized: the whole batch, or the last chunk.
    examples = input.shape[0] if not chunk or not input.shape[0] else (input.shape[0] - 1) % chunk + 1
    if examples == 1:
        if values_per_channel(input) == input.shape[0]:  # one value per channel and example
            if counters is None:  # checks=False: native's error
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {input.size()}")
            if policy.on_degenerate == "running_stats" and running_mean is not None:
                if recomputing:
                    return evaluate(input, weight, bias, running_mean, running_var, None, eps, *fused)
                _observe(state, counters, input, Event.DEGENERATE_HANDLED, compiling)
                return evaluate(input, weight, bias, running_mean, running_var, counters, eps, *fused)
            _observe(state, counters, input, Event.DEGENERATE_REFUSED, compiling)
        elif counters is not None and policy.on_single_sample != "ignore" and not recomputing:
            _observe(state, counters, input, Event.SINGLE_SAMPLE, compiling)
    if recomputing or state.pool is not None:
        # the micro-batch's statistics pooled (statistics.accumulate_stats), or nothing
        output, mean, invstd = OPS.forward_train(input, weight, bias, None, None, None, None, bn.momentum, eps,
                                                 *chunked)
        if not recomputing:
            state.pool.add_batch(input, mean, invstd, eps, chunk)
        return output
    if train is lowering.batch_norm_train and counters is not None:
        return train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, bn.momentum, eps,
                     *chunked, observe=lambda: _observe(state, counters, input, Event.TRAINING_BATCH, compiling))
    output = train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, bn.momentum, eps,
                   *chunked)
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
