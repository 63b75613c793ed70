"""SafeBatchNorm1d/2d/3d: drop-in subclasses of nn.BatchNorm1d/2d/3d.

Same constructor (plus keyword-only safety options), same state_dict keys,
same numbers; the forward goes through functional.batch_norm."""
from __future__ import annotations

import torch
from torch import nn

from . import functional
from .safety import NUM_COUNTERS, Policy, SafetyState, validate_hyperparameters

__all__ = ["SafeBatchNorm1d", "SafeBatchNorm2d", "SafeBatchNorm3d"]


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
        validate_hyperparameters(eps, momentum)
        policy = Policy(on_degenerate, on_nonfinite, on_single_sample, freeze_stats, checks, sync)
        if freeze_stats and not track_running_stats:
            raise ValueError("freeze_stats=True needs track_running_stats=True: there are no running statistics to use")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **native_options)
        self.safety_state = self._safety_state_class(policy, owner=f"{type(self).__name__}({num_features})")
        counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device) if checks else None
        # Not persistent: state_dict keys stay those of nn.BatchNorm.
        self.register_buffer("safety_counters", counters, persistent=False)

    @property
    def policy(self) -> Policy:
        return self.safety_state.policy

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = (self.training and not self.policy.freeze_stats) or self.running_mean is None
        return functional.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked,
            counters=self.safety_counters,
            state=self.safety_state,
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.policy.non_defaults().items())
        return super().extra_repr() + (", " + options if options else "")


class SafeBatchNorm1d(_SafeBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d over [N, C] or [N, C, L], guarded."""


class SafeBatchNorm2d(_SafeBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d over [N, C, H, W] (contiguous or channels_last), guarded."""


class SafeBatchNorm3d(_SafeBatchNormMixin, nn.BatchNorm3d):
    """nn.BatchNorm3d over [N, C, D, H, W] (contiguous or channels_last_3d), guarded."""


SAFE_FOR_NATIVE = {nn.BatchNorm1d: SafeBatchNorm1d, nn.BatchNorm2d: SafeBatchNorm2d, nn.BatchNorm3d: SafeBatchNorm3d}
