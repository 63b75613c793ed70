"""SafeBatchNormAct2d: batch norm, dropout, then an activation, in the shape
of timm's BatchNormAct2d (its children `drop` and `act`, its state_dict
keys), guarded. Where the dropout is an identity and the activation one of
activations.py, the activation runs inside the batch norm's kernels: its
forward writes act(bn(x)) in one pass, and its backward applies act' inside
the batch norm's backward. Any other activation runs as its own module."""
from __future__ import annotations

import torch
from torch import nn

from .activations import activation_module, fused_activation
from .distributed import SafeSyncBatchNorm
from .modules import SAFETY_OPTIONS_DOC, _call_as_fx_leaf, _SafeBatchNormMixin

__all__ = ["SafeBatchNormAct2d", "SafeSyncBatchNormAct"]


class SafeBatchNormAct2d(_SafeBatchNormMixin, nn.BatchNorm2d):
    __doc__ = (
        "nn.BatchNorm2d followed by `drop` and `act` (timm's BatchNormAct2d), guarded.\n\n"
        "    act: None, a name (relu, relu6, leaky_relu, silu, gelu, gelu_tanh, hardswish), an\n"
        "        activation module or module class. Fused into the batch norm where possible.\n"
        "    drop: a module applied between the batch norm and the activation (default: none).\n"
        + SAFETY_OPTIONS_DOC
    )

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
        act: str | nn.Module | type | None = "relu",
        drop: nn.Module | None = None,
        **options,  # the safety options and the installed torch's options, e.g. bias=False
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = activation_module(act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy) and input.tracer.path_of_module(self):
            return _call_as_fx_leaf(self, input)
        act, drop = self.act, self.drop
        fused = fused_activation(act) if type(drop) is nn.Identity else None
        if fused is None:
            return act(drop(super().forward(input)))
        kind, param = fused
        return super().forward(input, activation=int(kind), activation_param=param)


class SafeSyncBatchNormAct(SafeSyncBatchNorm):
    """SafeSyncBatchNorm followed by `drop` and `act` (timm's SyncBatchNormAct):
    what convert_model(distributed=True) makes of a batch norm with an
    activation. The activation runs as its own module."""

    def __init__(self, num_features: int, *args, act: str | nn.Module | type | None = "relu",
                 drop: nn.Module | None = None, **options) -> None:
        super().__init__(num_features, *args, **options)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = activation_module(act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))
