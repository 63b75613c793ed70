"""SafeFrozenBatchNorm2d: torchvision's FrozenBatchNorm2d (a batch norm whose
statistics and affine parameters are fixed buffers, what torchvision's
detection models use whenever pretrained weights are given), guarded: every
call checks its statistics, weight and bias (eval mode's check) and counts
what it finds. Same buffers, same state_dict keys, the same numbers to
rounding, and the same output dtype (a float16 input meets float32 buffers
in float32, as in torchvision's forward).

Imported only when torchvision is (convert_model looks its class up then)."""
from __future__ import annotations

import dataclasses

import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from . import deployment
from .modules import _SafeBatchNormMixin, _policy
from .policy import Policy

__all__ = ["SafeFrozenBatchNorm2d"]


class SafeFrozenBatchNorm2d(_SafeBatchNormMixin, FrozenBatchNorm2d):
    """torchvision.ops.FrozenBatchNorm2d, guarded. The safety options of
    SafeBatchNorm2d are accepted (convert_model passes them to every batch
    norm); those about training batches do not apply, its statistics being frozen."""

    # What the guarded forward reads of a batch norm: statistics that no
    # training call updates.
    momentum = None
    num_batches_tracked = None
    track_running_stats = True
    virtual_batch_size = None

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, **options) -> None:
        options["freeze_stats"] = True
        policy = _policy(**options)
        FrozenBatchNorm2d.__init__(self, num_features, eps)
        self.num_features = num_features
        self._init_safety(policy, device)
        if device is not None:
            self.to(device)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    @torch.jit.unused
    def _guarded_forward(self, input: torch.Tensor, activation: int, activation_param: float) -> torch.Tensor:
        dtype = torch.promote_types(input.dtype, self.weight.dtype)
        return super()._guarded_forward(input.to(dtype), activation, activation_param)

    def _native_forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return deployment.native_batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, None,
                                            False, True, None, self.eps)

    def set_policy(self, policy: Policy) -> None:
        super().set_policy(dataclasses.replace(policy, freeze_stats=True))

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.policy.non_defaults().items() if k != "freeze_stats")
        return f"{self.num_features}, eps={self.eps}" + (", " + options if options else "")

    def __repr__(self) -> str:
        return torch.nn.Module.__repr__(self)
