"""The host-overhead benchmark (`torch-safebn bench --preset host`): what one
call of a batch norm costs the host, on tensors so small that the kernels'
work is negligible next to Python, the dispatcher, autograd and the checks'
own ops. Every call pays this cost, on the GPU too, where a model of small
layers runs at its rate.

It times the layer benchmark's workloads and statements (layer_bench) in turns
(timing.time_in_turns), and differs from the layer benchmark in three ways:

- the peer is nn.BatchNorm1d/2d/3d itself ("native-module"), whose Python
  forward does the same work per call as SafeBatchNorm's (the input check,
  num_batches_tracked += 1), rather than F.batch_norm alone;
- one thread by default: there is nothing to split, and idle threads only
  add noise;
- no copy bandwidth and no GB/s: nothing here is bound by memory.

On CUDA a block of calls is launched without waiting for the GPU and
synchronized once at its end (timing.py): the time per call of a loop that does
not wait for the GPU, which is the host's time wherever the GPU keeps up."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import layer_bench
from .layer_bench import Implementation, Workload
from .machine import machine_block, torch_threads
from .timing import time_in_turns

__all__ = ["DEFAULT_PEERS", "FORMAT", "PASSES", "ROW_FIELDS", "SHAPES", "run"]

FORMAT = "torch_safebn.host/1"

# 8 channels of 16 values each, as 2-D, 4-D (issue 13's measurement: [4, 8, 2, 2]) and 5-D input.
SHAPES = ((16, 8), (4, 8, 2, 2), (2, 8, 2, 2, 2))
PASSES = ("fwd", "fwdbwd", "eval")  # training forward, forward + backward, eval forward under no_grad
DEFAULT_PEERS = ("native-module",)
DEFAULT_THREADS = 1
DEFAULT_MIN_RUN_TIME = 1.0  # seconds per implementation and workload: calls of tens of microseconds vary by 10%

# The layer benchmark's row, less what concerns bandwidth.
_BANDWIDTH_FIELDS = ("bytes", "gb_per_s", "copy_gb_per_s", "pct_copy_bandwidth")
ROW_FIELDS = {field: spec for field, spec in layer_bench.ROW_FIELDS.items() if field not in _BANDWIDTH_FIELDS}


def run(
    plan: Sequence[Workload],
    implementations: Sequence[Implementation],
    device: str | torch.device = "cpu",
    threads: int = DEFAULT_THREADS,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    on_measured: Callable[[Workload, Implementation], None] | None = None,
) -> dict:
    """Times every implementation on every workload of the plan, in turns per
    workload, and returns {"format", "created", "machine", "settings", "rows"}
    (rows: ROW_FIELDS). on_measured(workload, impl) follows each row."""
    device = torch.device(device)
    layer_bench.check_devices(implementations, device)
    with torch_threads(threads):
        machine = machine_block(device, threads)
        rows = []
        for workload in plan:
            timed = time_in_turns(layer_bench.statements(workload, implementations, device), threads, min_run_time)
            rows += layer_bench.timing_fields(workload, list(zip(implementations, timed)), machine)
            for impl in implementations:
                if on_measured:
                    on_measured(workload, impl)
    return layer_bench.make_result(machine, rows, {"min_run_time_s": min_run_time}, format_name=FORMAT)
