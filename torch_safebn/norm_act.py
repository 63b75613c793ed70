"""SafeBatchNormAct2d and SafeSyncBatchNormAct: batch norm, dropout, then an
activation, in the shape of timm's BatchNormAct2d and SyncBatchNormAct (their
children `drop` and `act`, their state_dict keys), guarded. Where the dropout
is an identity and the activation one of activations.py, the activation runs
inside the batch norm's kernels: its forward writes act(bn(x)) in one pass,
and its backward applies act' inside the batch norm's backward. Any other
activation, and any call where the activation must stay a module of its own
(a deployment artifact, torch.func transforms), runs it after the batch norm."""
from __future__ import annotations

import torch
from torch import nn

from . import functional
from .activations import activation_module, fused_activation
from .distributed import SafeSyncBatchNorm
from .modules import SAFETY_OPTIONS_DOC, _call_as_fx_leaf, _SafeBatchNormMixin

__all__ = ["SafeBatchNormAct2d", "SafeSyncBatchNormAct"]

_ACT_DOC = (
    "    act: None, a name (relu, relu6, leaky_relu, silu, gelu, gelu_tanh, hardswish), an\n"
    "        activation module or module class. Fused into the batch norm where possible.\n"
    "    drop: a module applied between the batch norm and the activation (default: none).\n"
)


class _ActivationMixin:
    """act(drop(batch norm)), the activation fused where possible; put before
    the batch norm class."""

    def __init__(self, *args, act: str | nn.Module | type | None = "relu", drop: nn.Module | None = None,
                 **options) -> None:
        super().__init__(*args, **options)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = activation_module(act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.act(self.drop(self._native_forward(input)))
        return self._activated_forward(input)

    @torch.jit.unused
    def _activated_forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy) and input.tracer.path_of_module(self):
            return _call_as_fx_leaf(self, input)
        fused = None
        if type(self.drop) is nn.Identity and functional.fuses_activation():
            fused = fused_activation(self.act)
        if fused is None:
            return self.act(self.drop(self._guarded_forward(input, 0, 0.0)))
        kind, param = fused
        return self._guarded_forward(input, int(kind), param)


class SafeBatchNormAct2d(_ActivationMixin, _SafeBatchNormMixin, nn.BatchNorm2d):
    __doc__ = ("nn.BatchNorm2d followed by `drop` and `act` (timm's BatchNormAct2d), guarded.\n\n" + _ACT_DOC
               + SAFETY_OPTIONS_DOC)


class SafeSyncBatchNormAct(_ActivationMixin, SafeSyncBatchNorm):
    __doc__ = ("SafeSyncBatchNorm followed by `drop` and `act` (timm's SyncBatchNormAct): what "
               "convert_model(distributed=True) makes of a batch norm with an activation.\n\n" + _ACT_DOC
               + SAFETY_OPTIONS_DOC)
