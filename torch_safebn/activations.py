"""The activations batch norm fuses (csrc/activation.h): their codes, their
names, and which activation modules, torch's and timm's (when timm is
installed), are one of them. Any other activation runs as its own module
after the batch norm."""
from __future__ import annotations

import enum
import importlib.util

import torch
from torch import nn

__all__ = ["Activation", "FusedActivation", "fused_activation", "activation_module"]


class Activation(enum.IntEnum):
    """Codes of the ops' `activation` argument, in the order of csrc/activation.h."""

    IDENTITY = 0
    RELU = 1
    RELU6 = 2
    LEAKY_RELU = 3  # parameter: the negative slope
    SILU = 4
    GELU = 5  # erf form
    GELU_TANH = 6  # tanh approximation
    HARDSWISH = 7


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
_NAMES = {
    "identity": Activation.IDENTITY,
    "relu": Activation.RELU,
    "relu6": Activation.RELU6,
    "leaky_relu": Activation.LEAKY_RELU,
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu": Activation.GELU,
    "gelu_tanh": Activation.GELU_TANH,
    "hardswish": Activation.HARDSWISH,
    "hard_swish": Activation.HARDSWISH,
}


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


def reference_activation(x: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    """act(x) in torch's functional forms, as the ops' reference computes it
    (differentiable: the reference's composite forwards rely on it)."""
    functions = {
        Activation.IDENTITY: lambda t: t,
        Activation.RELU: torch.relu,
        Activation.RELU6: lambda t: torch.nn.functional.hardtanh(t, 0.0, 6.0),
        Activation.LEAKY_RELU: lambda t: torch.nn.functional.leaky_relu(t, param),
        Activation.SILU: torch.nn.functional.silu,
        Activation.GELU: torch.nn.functional.gelu,
        Activation.GELU_TANH: lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        Activation.HARDSWISH: torch.nn.functional.hardswish,
    }
    return functions[Activation(kind)](x)


def reference_derivative(z: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    """act'(z), with torch's values at the kinks (csrc/activation.h)."""
    kind = Activation(kind)
    if kind == Activation.IDENTITY:
        return torch.ones_like(z)
    if kind == Activation.RELU:
        return (z > 0).to(z.dtype)
    if kind == Activation.RELU6:
        return ((z > 0) & (z < 6)).to(z.dtype)
    if kind == Activation.LEAKY_RELU:
        return torch.where(z > 0, 1.0, torch.full_like(z, param))  # a tensor: two scalars would give float32
    if kind == Activation.SILU:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if kind == Activation.GELU:
        return 0.5 * torch.erfc(-z * 0.5**0.5) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5
    if kind == Activation.GELU_TANH:
        inner = (2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)
        s = torch.sigmoid(2 * inner)
        return s + 2 * z * s * (1 - s) * (2 / torch.pi) ** 0.5 * (1 + 3 * 0.044715 * z * z)
    return torch.where(z <= -3, 0.0, torch.where(z >= 3, 1.0, z / 3 + 0.5)).to(z.dtype)  # hardswish
