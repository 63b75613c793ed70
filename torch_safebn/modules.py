"""SafeBatchNorm1d/2d/3d: drop-in subclasses of nn.BatchNorm1d/2d/3d.

Same constructor (plus keyword-only safety options), same state_dict keys,
same numbers; the forward goes through functional.guarded_batch_norm."""
from __future__ import annotations

import torch
from torch import nn

from . import functional
from .safety import NUM_COUNTERS, SAFETY_OPTIONS, Policy, SafetyState, validate_eps, validate_momentum

__all__ = ["SafeBatchNorm1d", "SafeBatchNorm2d", "SafeBatchNorm3d", "SafeLazyBatchNorm1d", "SafeLazyBatchNorm2d",
           "SafeLazyBatchNorm3d"]

SAFETY_OPTIONS_DOC = """
    Safety options (keyword-only; torch_safebn.convert_model passes them on):

    on_degenerate ("raise" | "running_stats"): a training batch with one value
        per channel, whose variance is 0/0: raise DegenerateBatchError (a
        ValueError), or normalize it with the running statistics, leave them
        untouched and warn once.
    on_nonfinite ("raise" | "warn" | "skip"): NaN/Inf in the batch statistics,
        the weight or the bias (in eval mode: in the running statistics, or
        running_var + eps <= 0). The running buffers never take such a batch;
        raise NonFiniteError (a FloatingPointError) naming the module and the
        step, warn once, or only count.
    on_single_sample ("warn" | "ignore" | "raise"): a training batch of one
        example with more than one value per channel, normalized against
        itself: warn once, say nothing, or raise DegenerateBatchError.
    freeze_stats (False): use the running statistics and never update them,
        in training too (.train() does not undo it).
    checks (True): False turns every check off, for measuring their cost;
        the module then behaves as nn.BatchNorm.
    sync (False): on CUDA, raise in the forward that saw the problem, at the
        cost of a host synchronization per call; by default the error comes at
        the next forward of the module, or from torch_safebn.check(model).

    torch_safebn.report(model) reads the per-module counters.
"""


def _policy(on_degenerate="raise", on_nonfinite="raise", on_single_sample="warn", freeze_stats=False, checks=True,
            sync=False, track_running_stats=True) -> Policy:
    if freeze_stats and not track_running_stats:
        raise ValueError("freeze_stats=True needs track_running_stats=True: there are no running statistics to use")
    return Policy(on_degenerate, on_nonfinite, on_single_sample, freeze_stats, checks, sync)


class _SafeBatchNormMixin:
    """The safe forward, shared by the safe classes; put before the nn class."""

    _safety_state_class = SafetyState  # SafeSyncBatchNorm's also speaks for its rank

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        on_degenerate: str = "raise",
        on_nonfinite: str = "raise",
        on_single_sample: str = "warn",
        freeze_stats: bool = False,
        checks: bool = True,
        sync: bool = False,
        **native_options,  # options of the installed torch's class, e.g. bias=False
    ) -> None:
        policy = _policy(on_degenerate, on_nonfinite, on_single_sample, freeze_stats, checks, sync, track_running_stats)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **native_options)
        self._init_safety(policy, device)

    def _init_safety(self, policy: Policy, device) -> None:
        self.safety_state = self._safety_state_class(policy, owner=f"{type(self).__name__}({self.num_features})")
        counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device) if policy.checks else None
        # Not persistent: state_dict keys stay those of nn.BatchNorm.
        self.register_buffer("safety_counters", counters, persistent=False)

    def __setattr__(self, name: str, value) -> None:
        # Validated when set, not at every call: eps and momentum reach the
        # ops as floats (a NumPy or 0-d tensor scalar is accepted, as native does).
        if name == "eps":
            value = validate_eps(value)
        elif name == "momentum":
            value = validate_momentum(value)
        super().__setattr__(name, value)

    @property
    def policy(self) -> Policy:
        return self.safety_state.policy

    def set_policy(self, policy: Policy) -> None:
        """Applies another policy; turning checks on or off adds or drops the counters."""
        if policy.freeze_stats and not self.track_running_stats:
            raise ValueError("freeze_stats=True needs track_running_stats=True: there are no running statistics to use")
        if policy.checks and self.safety_counters is None:
            device = next((t.device for t in self.parameters()), None) or next(
                (t.device for t in self.buffers()), None)
            self.safety_counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)
        elif not policy.checks:
            self.safety_counters = None
        self.safety_state.policy = policy

    def forward(self, input: torch.Tensor, *, activation: int = 0, activation_param: float = 0.0) -> torch.Tensor:
        """`activation`: fused after the batch norm (activations.Activation;
        SafeBatchNormAct2d passes it), 0 for none."""
        if isinstance(input, torch.fx.Proxy) and input.tracer.path_of_module(self):
            return _call_as_fx_leaf(self, input)
        self._check_input_dim(input)
        state = self.safety_state
        training = self.training and not state.policy.freeze_stats
        running_mean, running_var, num_batches_tracked = self.running_mean, self.running_var, self.num_batches_tracked
        if training and not self.track_running_stats:
            # As nn.BatchNorm: buffers that training does not track stay as they are.
            running_mean = running_var = num_batches_tracked = None
        return functional.guarded_batch_norm(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            num_batches_tracked,
            self.safety_counters,
            training or running_mean is None,
            self.momentum,
            self.eps,
            state,
            activation,
            activation_param,
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.policy.non_defaults().items())
        return super().extra_repr() + (", " + options if options else "")


def _call_as_fx_leaf(module: nn.Module, input: torch.fx.Proxy) -> torch.fx.Proxy:
    """torch.fx records torch.nn's modules as calls (leaves) and traces into
    all others; a drop-in batch norm records itself as the call its native
    counterpart would be, so that a traced model keeps the module, its
    safety and its name (torchvision's feature extraction relies on both).
    As the root of a trace it is traced into, and fails as native's does."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


class SafeBatchNorm1d(_SafeBatchNormMixin, nn.BatchNorm1d):
    __doc__ = "nn.BatchNorm1d over [N, C] or [N, C, L], guarded.\n" + SAFETY_OPTIONS_DOC


class SafeBatchNorm2d(_SafeBatchNormMixin, nn.BatchNorm2d):
    __doc__ = "nn.BatchNorm2d over [N, C, H, W] (contiguous or channels_last), guarded.\n" + SAFETY_OPTIONS_DOC


class SafeBatchNorm3d(_SafeBatchNormMixin, nn.BatchNorm3d):
    __doc__ = "nn.BatchNorm3d over [N, C, D, H, W] (contiguous or channels_last_3d), guarded.\n" + SAFETY_OPTIONS_DOC


class _SafeLazyBatchNormMixin(_SafeBatchNormMixin):
    """nn.LazyBatchNorm's constructor (no num_features: the first input says
    it), the safety options, and on the first forward the class it becomes."""

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, **options) -> None:
        safety_options = {name: options.pop(name) for name in SAFETY_OPTIONS if name in options}
        policy = _policy(track_running_stats=track_running_stats, **safety_options)
        # nn.LazyBatchNorm's __init__, past the mixin's (which takes num_features); what
        # is left of the options are the installed torch's, e.g. bias=False
        super(_SafeBatchNormMixin, self).__init__(eps, momentum, affine, track_running_stats, device, dtype,
                                                  **options)
        self._init_safety(policy, device)

    def initialize_parameters(self, input: torch.Tensor) -> None:
        super().initialize_parameters(input)
        self.safety_state.owner = f"{self.cls_to_become.__name__}({self.num_features})"


class SafeLazyBatchNorm1d(_SafeLazyBatchNormMixin, nn.LazyBatchNorm1d):
    __doc__ = "nn.LazyBatchNorm1d, guarded: a SafeBatchNorm1d once its first input is seen.\n" + SAFETY_OPTIONS_DOC
    cls_to_become = SafeBatchNorm1d


class SafeLazyBatchNorm2d(_SafeLazyBatchNormMixin, nn.LazyBatchNorm2d):
    __doc__ = "nn.LazyBatchNorm2d, guarded: a SafeBatchNorm2d once its first input is seen.\n" + SAFETY_OPTIONS_DOC
    cls_to_become = SafeBatchNorm2d


class SafeLazyBatchNorm3d(_SafeLazyBatchNormMixin, nn.LazyBatchNorm3d):
    __doc__ = "nn.LazyBatchNorm3d, guarded: a SafeBatchNorm3d once its first input is seen.\n" + SAFETY_OPTIONS_DOC
    cls_to_become = SafeBatchNorm3d


SAFE_FOR_NATIVE = {nn.BatchNorm1d: SafeBatchNorm1d, nn.BatchNorm2d: SafeBatchNorm2d, nn.BatchNorm3d: SafeBatchNorm3d,
                   nn.LazyBatchNorm1d: SafeLazyBatchNorm1d, nn.LazyBatchNorm2d: SafeLazyBatchNorm2d,
                   nn.LazyBatchNorm3d: SafeLazyBatchNorm3d}
