"""SafeSyncBatchNorm's host cost per call: 2 gloo processes on this machine, one
thread each, a training forward + backward on a tiny tensor, where the kernels'
work is negligible and what is left is Python, the dispatcher, autograd and the
collectives. Timed in turns in the same processes, rounds of calls started
together on both ranks (a barrier before each):

  sync         SafeSyncBatchNorm2d
  local        SafeBatchNorm2d, no collective
  collectives  what SafeSyncBatchNorm adds: the forward's all_gather of a row
               (header, count, examples, mean and variance of C channels) and
               the backward's all_reduce of 2C sums, as functional collectives
  local+collectives  the two in one step, as SafeSyncBatchNorm interleaves
               them: a step that waits in collectives between its ops costs
               the host more than the two apart (caches, wake-ups)

sync against local+collectives is its own cost beyond the two; the sum of
the separate local and collectives is given too. Each is
timed twice: the wall clock per call, which includes waiting for the other
rank (on a 2-core machine, for the scheduler), and the calling thread's CPU
time per call, which counts the host's own work (Python, dispatcher,
autograd, the ops) and not the waits nor gloo's transport threads. Both
clocks move by tens of microseconds from run to run on a shared VM, so
each step's Python function calls are also counted (cProfile), which do not.

    python benchmarks/sync_host.py [--rounds 15] [--calls 200]

writes benchmarks/results/sync-host-cpu.json and prints the medians.
"""
import argparse
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_safebn
from torch_safebn.tools.machine import machine_block

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLD_SIZE = 2
SHAPE = (16, 8, 2, 2)
ROW_HEADER = 5  # csrc/sync.cpp's kHeader


def _training_step(module: torch.nn.Module, x: torch.Tensor):
    def step() -> None:
        module(x).sum().backward()
    return step


def _collectives(channels: int, module: torch.nn.Module | None = None, x: torch.Tensor | None = None):
    """The collectives alone, or with `module`'s training step on `x` in
    between, where SafeSyncBatchNorm makes them."""
    group = dist.group.WORLD.group_name
    row = torch.zeros(ROW_HEADER + 2 + 2 * channels, dtype=torch.float64)
    sums = torch.zeros(2 * channels)
    ops = torch.ops._c10d_functional
    local = _training_step(module, x) if module is not None else None

    def step() -> None:
        ops.wait_tensor(ops.all_gather_into_tensor(row, WORLD_SIZE, group))
        if local is not None:
            local()
        ops.wait_tensor(ops.all_reduce(sums, "sum", group))
    return step


def _rank(rank: int, init_method: str, rounds: int, calls: int, path: str) -> None:
    torch.set_num_threads(1)
    # A rank left waiting in a collective fails after two minutes instead of hanging the benchmark.
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(minutes=2))
    try:
        timings = _time_in_turns(rank, rounds, calls)
    finally:
        dist.destroy_process_group()  # the modules are gone: nothing holds the group (README)
    if rank == 0:
        _write(path, timings, rounds, calls)


def _time_in_turns(rank: int, rounds: int, calls: int) -> tuple[dict, dict, dict]:
    """Microseconds per call, wall clock and the thread's CPU time, a list per
    implementation, one value per round; and each implementation's Python
    calls per step (_work_per_step)."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    steps = {"sync": _training_step(torch_safebn.SafeSyncBatchNorm(SHAPE[1]), x),
             "local": _training_step(torch_safebn.SafeBatchNorm2d(SHAPE[1]), x),
             "collectives": _collectives(SHAPE[1]),
             "local+collectives": _collectives(SHAPE[1], torch_safebn.SafeBatchNorm2d(SHAPE[1]), x)}
    per_call = {name: [] for name in steps}
    cpu_per_call = {name: [] for name in steps}
    for step in steps.values():  # warm-up: the sync module registers with its group
        for _ in range(10):
            step()
    work = {name: _work_per_step(step) for name, step in steps.items()}
    for r in range(rounds):
        names = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]  # each goes first in turn
        for name in names:
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                steps[name]()
            per_call[name].append((time.perf_counter() - start) / calls * 1e6)
            cpu_per_call[name].append((time.thread_time() - cpu_start) / calls * 1e6)
    return per_call, cpu_per_call, work


def _work_per_step(step, steps: int = 20) -> dict[str, float]:
    """Python function calls per step (cProfile), counted over `steps` steps.
    Operator calls are not counted here: after a torch.profiler session the
    functional collectives' Python path makes more calls, which skewed the
    comparison, and one run profiled that way ended with a rank killed by a
    signal (benchmarks/README.md)."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        step()
    profile.disable()
    return {"python_calls": sum(entry.callcount for entry in profile.getstats()) / steps}


def _write(path: str, timings: tuple[dict, dict, dict], rounds: int, calls: int) -> None:
    per_call, cpu_per_call, work = timings
    median = {name: statistics.median(times) for name, times in per_call.items()}
    cpu_median = {name: statistics.median(times) for name, times in cpu_per_call.items()}
    beyond = median["sync"] - median["local+collectives"]
    cpu_beyond = cpu_median["sync"] - cpu_median["local+collectives"]
    beyond_apart = median["sync"] - median["local"] - median["collectives"]
    cpu_beyond_apart = cpu_median["sync"] - cpu_median["local"] - cpu_median["collectives"]
    result = {
        "format": "torch_safebn.sync_host/1", "created": datetime.now(timezone.utc).isoformat(),
        "machine": machine_block(torch.device("cpu"), 1), "world_size": WORLD_SIZE, "backend": "gloo",
        "shape": list(SHAPE), "pass": "training forward + backward", "rounds": rounds, "calls_per_round": calls,
        "median_us": median, "per_round_us": per_call,
        "sync_beyond_local_and_collectives_in_one_step_us": beyond,
        "sync_beyond_local_plus_collectives_apart_us": beyond_apart,
        "thread_cpu_median_us": cpu_median, "thread_cpu_per_round_us": cpu_per_call,
        "thread_cpu_sync_beyond_local_and_collectives_in_one_step_us": cpu_beyond,
        "thread_cpu_sync_beyond_local_plus_collectives_apart_us": cpu_beyond_apart,
        "work_per_step": work,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['machine']['device']}, {WORLD_SIZE} gloo ranks, 1 thread each, {list(SHAPE)}, "
          f"forward + backward, median of {rounds} rounds of {calls} calls (us per call; Python calls per step):")
    print(f"  {'':17} {'wall':>8} {'thread CPU':>11} {'Python calls':>13}")
    for name in median:
        print(f"  {name:17} {median[name]:8.1f} {cpu_median[name]:11.1f} {work[name]['python_calls']:13.0f}")
    print(f"  sync - (local+collectives): {beyond:+.1f} us wall, {cpu_beyond:+.1f} us thread CPU")
    print(f"  sync - local - collectives, timed apart: {beyond_apart:+.1f} us wall, "
          f"{cpu_beyond_apart:+.1f} us thread CPU")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", default=os.path.join(RESULTS, "sync-host-cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(f"file://{folder}/init", args.rounds, args.calls, args.json), nprocs=WORLD_SIZE)
    sys.exit(0)
