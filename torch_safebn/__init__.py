"""torch_safebn: batch normalization for PyTorch with fused C++/CUDA kernels
that cannot be silently poisoned. See README.md."""
from ._ops import BACKEND as _BACKEND
from .convert import convert_model, revert_model
from .distributed import SafeSyncBatchNorm
from .errors import DegenerateBatchError, NonFiniteError, SafetyError, UnconvertedBatchNormError
from .functional import batch_norm, batch_norm_act
from .modules import (
    SafeBatchNorm1d,
    SafeBatchNorm2d,
    SafeBatchNorm3d,
    SafeLazyBatchNorm1d,
    SafeLazyBatchNorm2d,
    SafeLazyBatchNorm3d,
)
from .norm_act import SafeBatchNormAct2d, SafeSyncBatchNormAct
from .report import Report, check, name_modules, report
from .statistics import Recalibration, accumulate_stats, recalibrate

__version__ = "0.1.0"

__all__ = [
    "SafeBatchNorm1d",
    "SafeBatchNorm2d",
    "SafeBatchNorm3d",
    "SafeLazyBatchNorm1d",
    "SafeLazyBatchNorm2d",
    "SafeLazyBatchNorm3d",
    "SafeSyncBatchNorm",
    "SafeBatchNormAct2d",
    "SafeSyncBatchNormAct",
    "batch_norm",
    "batch_norm_act",
    "convert_model",
    "revert_model",
    "backend",
    "report",
    "check",
    "name_modules",
    "Report",
    "accumulate_stats",
    "recalibrate",
    "Recalibration",
    "SafetyError",
    "DegenerateBatchError",
    "NonFiniteError",
    "UnconvertedBatchNormError",
]


def backend() -> str:
    """Which implementation is live: "cuda+cpu" or "cpu" (compiled kernels), or
    "reference" (the pure-PyTorch fallback, when the extension did not load)."""
    return _BACKEND
