"""The machine a result was measured on (every result's "machine" block), and
torch's thread count held for the length of a run.

Only torch and the library are imported here, so that `torch-safebn info`
can describe the machine without loading torch.utils.benchmark."""
from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch

import torch_safebn
from torch_safebn import _extension

__all__ = ["device_name", "machine_block", "torch_threads", "usable_cpus"]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model as /proc/cpuinfo gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """The CPUs this process may run on (a container or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_block(device: torch.device, threads: int) -> dict:
    """What every benchmark result records about where it ran. The CPU is named
    on CUDA runs too: the host's speed sets the time of every small call."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": device_name(torch.device("cpu")),
        "cpus": usable_cpus(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_version": torch.__version__,
        "torch_safebn_version": torch_safebn.__version__,
        # Which build ran: an A/B of two builds in one checkout is only as good as these.
        "torch_safebn_build": _extension.built_from(),
        "torch_safebn_path": os.path.dirname(os.path.abspath(torch_safebn.__file__)),
        "backend": torch_safebn.backend(),
        "threads": threads,
        # Other processes on the same cores slow every row alike and widen the IQRs.
        "load_average_1min": os.getloadavg()[0],
    }


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's thread count set to threads inside, restored after. Set globally,
    not only in the Timer: torch.compile fixes its kernels' thread count when it compiles."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
