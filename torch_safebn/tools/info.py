"""`torch-safebn info`: what is installed and where it runs: versions, the live
backend, whether CUDA kernels are registered, the CPU, threads and GPU."""
from __future__ import annotations

import argparse

import torch

import torch_safebn

from .machine import device_name, usable_cpus

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    # backend() is "cuda+cpu" exactly when the extension registered CUDA kernels for the ops.
    has_cuda_kernels = torch_safebn.backend() == "cuda+cpu"
    lines = {
        "torch_safebn": torch_safebn.__version__,
        "torch": torch.__version__,
        "backend": torch_safebn.backend(),
        "safebn CUDA kernels": "registered" if has_cuda_kernels else "not registered",
        "torch CUDA": torch.version.cuda or "none (CPU-only torch)",
        "torch CUDA archs": " ".join(torch.cuda.get_arch_list()) or "none",
        "CPU": f"{device_name(torch.device('cpu'))}, {usable_cpus()} CPUs usable, "
               f"capability {torch.backends.cpu.get_cpu_capability()}",
        "threads": str(torch.get_num_threads()),
        "GPU": device_name(torch.device("cuda")) if torch.cuda.is_available() else "none",
    }
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0
