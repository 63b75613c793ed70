"""SafeBatchNorm1d/2d/3d: drop-in subclasses of nn.BatchNorm1d/2d/3d.

Same constructor (plus keyword-only safety options), same state_dict keys,
same numbers; the forward goes through functional.guarded_forward."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import deployment, functional
from .caller_warnings import warn_at_caller
from .contract import NUM_COUNTERS
from .policy import SAFETY_OPTIONS, Policy, validate_eps, validate_momentum
from .state import SafetyState

__all__ = ["SafeBatchNorm1d", "SafeBatchNorm2d", "SafeBatchNorm3d", "SafeLazyBatchNorm1d", "SafeLazyBatchNorm2d",
           "SafeLazyBatchNorm3d"]

SAFETY_OPTIONS_DOC = """
    virtual_batch_size (None): a ghost batch norm: in training, each chunk of
        that many examples (the last may be smaller) is normalized with its own
        statistics, in the fused kernels; the running statistics are updated
        once per call from the whole batch's. Eval mode is unchanged.

    Safety options (keyword-only; torch_safebn.convert_model passes them on):

    on_degenerate ("raise" | "running_stats"): a training batch with one value
        per channel, whose variance is 0/0: raise DegenerateBatchError (a
        ValueError), or normalize it with the running statistics, leave them
        untouched and warn.
    on_nonfinite ("raise" | "warn" | "skip"): NaN/Inf in the batch statistics,
        the weight or the bias (in eval mode: in the running statistics, or
        running_var + eps <= 0). The running buffers never take such a batch;
        raise NonFiniteError (a FloatingPointError) naming the module and the
        step, warn (once per module), or only count.
    on_single_sample ("warn" | "ignore" | "raise"): a training batch of one
        example with more than one value per channel, normalized against
        itself: warn, say nothing, or raise DegenerateBatchError.
    freeze_stats (False): use the running statistics and never update them,
        in training too (.train() does not undo it).
    checks (True): False turns every check off, for measuring their cost;
        the module then behaves as nn.BatchNorm.
    sync (False): on CUDA, raise in the forward that saw the problem, at the
        cost of a host synchronization per call; by default the error comes at
        the next forward of the module, or from torch_safebn.check(model).
    checkpoint_aware (True): a training forward that recomputes one inside a
        backward pass (activation checkpointing, torch.utils.checkpoint)
        normalizes as the first pass did and updates nothing; False updates
        the running statistics again, as nn.BatchNorm does.

    A model warns once per call and kind, at the line that called it, naming
    the first module and how many reported it; torch_safebn.report(model) reads
    the per-module counters.
"""


def _as_counts(counters):
    """The counters stay int64 when every buffer is set to another dtype
    (PyTorch's test_to does so), which native's batch norms survive: their
    num_batches_tracked works in any dtype."""
    if isinstance(counters, torch.Tensor) and counters.dtype != torch.int64:
        return counters.to(torch.int64)
    return counters


def _policy(track_running_stats=True, **options) -> Policy:
    if options.get("freeze_stats") and not track_running_stats:
        raise ValueError("freeze_stats=True needs track_running_stats=True: there are no running statistics to use")
    return Policy(**options)


class _SafeBatchNormMixin:
    """The safe forward, shared by the safe classes; put before the nn class."""

    _safety_state_class = SafetyState  # SafeSyncBatchNorm's also speaks for its rank
    __jit_unused_properties__ = ["policy"]  # TorchScript compiles properties it is not told to skip

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
        checkpoint_aware: bool = True,
        virtual_batch_size: int | None = None,
        **native_options,  # options of the installed torch's class, e.g. bias=False
    ) -> None:
        policy = _policy(track_running_stats, on_degenerate=on_degenerate, on_nonfinite=on_nonfinite,
                         on_single_sample=on_single_sample, freeze_stats=freeze_stats, checks=checks, sync=sync,
                         checkpoint_aware=checkpoint_aware)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **native_options)
        self._init_safety(policy, device)
        self.virtual_batch_size = virtual_batch_size

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
        elif name == "virtual_batch_size":
            value = self._validate_virtual_batch_size(value)
        elif name == "safety_counters":
            value = _as_counts(value)
        super().__setattr__(name, value)

    def _validate_virtual_batch_size(self, value) -> int | None:
        """A ghost batch norm's chunk size: None, or a whole number of examples >= 1."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"virtual_batch_size must be None or a whole number of examples >= 1, got {value!r}")
        return value

    @property
    def policy(self) -> Policy:
        return self.safety_state.policy

    def set_policy(self, policy: Policy) -> None:
        """Applies another policy; turning checks on or off adds or drops the counters."""
        if policy.freeze_stats and not self.track_running_stats:
            raise ValueError("freeze_stats=True needs track_running_stats=True: there are no running statistics to use")
        if policy.checks and self.safety_counters is None:
            self.safety_counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=self._state_device())
        elif not policy.checks:
            self.safety_counters = None
        self.safety_state.policy = policy

    def _state_device(self) -> torch.device | None:
        """The device of the module's parameters and buffers, the counters aside."""
        tensors = (t for name, t in [*self.named_parameters(), *self.named_buffers()] if name != "safety_counters")
        return next((t.device for t in tensors if t is not None), None)

    # The counters start at zero wherever the module's state comes to life:
    # a module made on the meta device holds no values, and to_empty() would
    # give its counters uninitialized memory; load_state_dict(assign=True)
    # brings every other tensor from the checkpoint but these (not part of it).
    # A conversion that casts every buffer (module._apply(lambda t: t.half()))
    # leaves them the counts they were, on the device it moved them to.
    def _apply(self, fn, recurse=True):
        before = self._buffers.get("safety_counters")
        had_values = before is not None and not before.is_meta
        module = super()._apply(fn, recurse)
        counters = self._buffers.get("safety_counters")
        if counters is not None:
            if counters.dtype != torch.int64:
                counters = before.to(counters.device) if had_values else _as_counts(counters)
                self._buffers["safety_counters"] = counters
            if not had_values and not counters.is_meta:
                counters.zero_()
        return module

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        device = self._state_device()
        if self.safety_counters is not None and self.safety_counters.is_meta and device and device.type != "meta":
            self.safety_counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._native_forward(input)
        return self._guarded_forward(input, 0, 0.0)

    def _native_forward(self, input: torch.Tensor) -> torch.Tensor:
        """A scripted module's forward: native's (a scripted model loads
        without torch_safebn), its statistics checked when it was scripted."""
        self._check_input_dim(input)
        return deployment.native_batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                            self.num_batches_tracked, self.training, self.track_running_stats,
                                            self.momentum, self.eps)

    @torch.jit.unused
    def _guarded_forward(self, input: torch.Tensor, activation: int, activation_param: float) -> torch.Tensor:
        """The forward with `activation` (activations.Activation, 0: none) fused after it."""
        if isinstance(input, torch.fx.Proxy) and input.tracer.path_of_module(self):
            return _call_as_fx_leaf(self, input)
        self._check_input_dim(input)
        return functional.guarded_forward(self, input, activation, activation_param, group=self._synchronizing())

    def _synchronizing(self) -> tuple[str, int] | None:
        """The name and size of the process group whose statistics a training call takes
        (SafeSyncBatchNorm), or None."""
        return None

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles native's forward (a scripted model loads
        without torch_safebn); the statistics and parameters it would use are
        checked now, once."""
        if self.policy.freeze_stats and self.training:
            raise RuntimeError(f"{self.safety_state.describe()}: freeze_stats=True has no scripted form in "
                               "training mode; script the model in eval mode (model.eval()).")
        deployment.check_artifact(self)
        return self

    def extra_repr(self) -> str:
        settings = {**self.policy.non_defaults(), **({"virtual_batch_size": self.virtual_batch_size}
                                                     if self.virtual_batch_size else {})}
        options = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return super().extra_repr() + (", " + options if options else "")


# The quantization tracers that were told, so that a trace warns once.
_WARNED_TRACERS: weakref.WeakSet = weakref.WeakSet()


def _call_as_fx_leaf(module: nn.Module, input: torch.fx.Proxy) -> torch.fx.Proxy:
    """torch.fx records torch.nn's modules as calls (leaves) and traces into
    all others; a drop-in batch norm records itself as the call its native
    counterpart would be, so that a traced model keeps the module, its
    safety and its name (torchvision's feature extraction relies on both).
    As the root of a trace it is traced into, and fails as native's does.
    FX graph mode quantization matches native's classes: unless it was given
    torch_safebn.fusion.backend_config(), it would leave the batch norms
    unfolded, which a warning says, once per trace."""
    tracer = input.tracer
    if type(tracer).__name__ == "QuantizationTracer" and tracer not in _WARNED_TRACERS:
        from . import fusion

        if not fusion.uses_safe_backend_config():
            _WARNED_TRACERS.add(tracer)
            count = sum(isinstance(getattr(m, "safety_state", None), SafetyState) for m in tracer.root.modules())
            warn_at_caller(
                f"FX graph mode quantization matches batch norms by their native class and would leave the model's "
                f"{count} torch_safebn batch norm{'s' if count != 1 else ''} (the first: "
                f"{module.safety_state.describe()}) unfolded and in float: pass "
                "backend_config=torch_safebn.fusion.backend_config() to prepare_fx, prepare_qat_fx, convert_fx and "
                "fuse_fx, or quantize torch_safebn.revert_model(model).")
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
        virtual_batch_size = options.pop("virtual_batch_size", None)
        policy = _policy(track_running_stats, **safety_options)
        # nn.LazyBatchNorm's __init__, past the mixin's (which takes num_features); what
        # is left of the options are the installed torch's, e.g. bias=False
        super(_SafeBatchNormMixin, self).__init__(eps, momentum, affine, track_running_stats, device, dtype,
                                                  **options)
        self._init_safety(policy, device)
        self.virtual_batch_size = virtual_batch_size

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
