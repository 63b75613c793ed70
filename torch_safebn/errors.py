"""The errors torch_safebn raises for what it guards against. Each is also
the class native batch norm raises in its place (or a builtin one beside
it), so that code catching native's errors keeps working."""
from __future__ import annotations

__all__ = ["SafetyError", "DegenerateBatchError", "NonFiniteError", "UnconvertedBatchNormError"]


class SafetyError(RuntimeError):
    """Base of the errors torch_safebn raises for what it guards against."""


class DegenerateBatchError(SafetyError, ValueError):
    """A training batch whose statistics cannot be estimated (one value per
    channel: native raises ValueError), or a batch of one example where
    on_single_sample='raise'."""


class NonFiniteError(SafetyError, FloatingPointError):
    """NaN or Inf in the batch statistics, the weight or bias, or the running statistics."""


class UnconvertedBatchNormError(TypeError):
    """convert_model(strict=True) met a batch norm it cannot guard."""
