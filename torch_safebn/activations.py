"""The activations batch norm fuses (csrc/activation.h): which activation
modules, torch's and timm's (when timm is installed), and which names are
one of them (their codes: contract.Activation). Any other activation runs as
its own module after the batch norm."""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .contract import ACTIVATION_NAMES, Activation

__all__ = ["Activation", "FusedActivation", "fused_activation", "activation_module"]


# An activation as the ops take it: (code, parameter).
FusedActivation = tuple[Activation, float]

# Exact types: a subclass may compute something else in its forward.
_TORCH_MODULES: dict[type, Activation] = {
    nn.Identity: Activation.IDENTITY,
    nn.ReLU: Activation.RELU,
    nn.ReLU6: Activation.RELU6,
    nn.LeakyReLU: Activation.LEAKY_RELU,
    nn.SiLU: Activation.SILU,
    nn.Hardswish: Activation.HARDSWISH,
}
# Every fused activation by its name (contract.def), and the names timm also uses.
_NAMES = {**ACTIVATION_NAMES, "swish": Activation.SILU, "hard_swish": Activation.HARDSWISH}


def _timm_modules() -> dict[type, Activation]:
    """timm's activation modules that compute one of ours, if timm is installed
    (found without importing it)."""
    if importlib.util.find_spec("timm") is None:
        return {}
    from timm.layers import activations as timm_activations

    return {
        timm_activations.Swish: Activation.SILU,
        timm_activations.HardSwish: Activation.HARDSWISH,
        timm_activations.GELU: Activation.GELU,
        timm_activations.GELUTanh: Activation.GELU_TANH,
    }


_timm_table: dict[type, Activation] | None = None


def fused_activation(module: nn.Module) -> FusedActivation | None:
    """The fused form of an activation module, or None when batch norm has no
    kernel for it. The parameter is read now: a later change of a
    LeakyReLU's slope needs another call."""
    global _timm_table
    kind = _TORCH_MODULES.get(type(module))
    if kind is None and type(module).__module__.startswith("timm."):
        if _timm_table is None:
            _timm_table = _timm_modules()
        kind = _timm_table.get(type(module))
    if kind is None and type(module) is nn.GELU:
        kind = Activation.GELU_TANH if module.approximate == "tanh" else Activation.GELU
    if kind is None:
        return None
    return kind, float(module.negative_slope) if kind == Activation.LEAKY_RELU else 0.0


def activation_module(act: str | nn.Module | type | None, negative_slope: float = 0.01) -> nn.Module:
    """The module for SafeBatchNormAct2d's `act`: None or a name (relu, relu6,
    leaky_relu, silu or swish, gelu, gelu_tanh, hardswish), a module, or a
    module class (instantiated without arguments)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    if isinstance(act, str) and act.lower() in _NAMES:
        kind = _NAMES[act.lower()]
        return {
            Activation.IDENTITY: nn.Identity,
            Activation.RELU: nn.ReLU,
            Activation.RELU6: nn.ReLU6,
            Activation.LEAKY_RELU: lambda: nn.LeakyReLU(negative_slope),
            Activation.SILU: nn.SiLU,
            Activation.GELU: nn.GELU,
            Activation.GELU_TANH: lambda: nn.GELU(approximate="tanh"),
            Activation.HARDSWISH: nn.Hardswish,
        }[kind]()
    raise ValueError(
        f"act must be None, a module, a module class or one of {', '.join(map(repr, _NAMES))}; got {act!r}"
    )
