"""torch.utils.cpp_extension, as it is imported, looks for CUDA and on a
machine with nvcc but no GPU logs "No CUDA runtime is found, using
CUDA_HOME=...". The tools never build an extension, yet torch.utils.benchmark
(the benchmarks' Timer) and torch.library.opcheck's test utilities (the
self-check) import it: that notice would open the output of `bench` and
`check` with a warning that concerns neither."""
from __future__ import annotations

import importlib
import logging

__all__ = ["import_cpp_extension_quietly"]


def import_cpp_extension_quietly() -> None:
    """Imports torch.utils.cpp_extension with its logger held at ERROR for the
    import only, so that later imports of it (it is imported once) say nothing
    either; its warnings after the import are left alone."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)
