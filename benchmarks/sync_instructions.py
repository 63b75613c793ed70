"""SafeSyncBatchNorm's host cost in instructions, which, unlike the clocks of
sync_host.py, barely move from run to run: each of 2 gloo ranks runs under
valgrind's callgrind, 30 warm-up training steps on [16, 8, 2, 2] and then 200
counted ones; the calling thread's instructions per counted step. Two
implementations, as sync_host.py's:

  sync               SafeSyncBatchNorm2d
  local+collectives  SafeBatchNorm2d with the all_gather of a row and the
                     all_reduce of 2C sums around it, as functional collectives

Only the counted steps are counted: callgrind zeroes its counters when a rank
calls getppid() right before them and dumps them when it calls getpgrp()
right after (neither is called anywhere else in a step). An earlier version
took the difference of two whole processes (200 steps and none), start-up
and teardown included, and its teardown (freeing the interpreter's objects)
moved the result by up to 15k instructions per step from run to run.
PYTHONHASHSEED is fixed, so that Python's string hashes are the same in every
run; where the gloo threads' allocations land still moves Python's objects,
and with them the collisions in dictionaries keyed by address, so the
measurement is repeated (--runs, the two modes alternating) and every run
is reported with the median. A run is both ranks of each mode under
valgrind, four processes, about 4 minutes on 2 cores:

    python benchmarks/sync_instructions.py --runs 3     # runs them, then reads them
    python benchmarks/sync_instructions.py --read DIR   # reads the outputs of an earlier run

writes benchmarks/results/sync-instructions-cpu.json and prints the counts.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed as dist

import torch_safebn
from torch_safebn.tools.machine import machine_block

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WARM_UP, STEPS = 30, 200
MODES = ("sync", "local+collectives")


def _rank(rank: int, mode: str, init_method: str) -> None:
    """One rank's steps (run under callgrind by main)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(minutes=10))
    torch.manual_seed(rank)
    x = torch.randn(16, 8, 2, 2).requires_grad_()
    if mode == "sync":
        module = torch_safebn.SafeSyncBatchNorm(8)

        def step() -> None:
            module(x).sum().backward()
    else:
        local, group, ops = torch_safebn.SafeBatchNorm2d(8), dist.group.WORLD.group_name, torch.ops._c10d_functional
        row, sums = torch.zeros(5 + 2 + 16, dtype=torch.float64), torch.zeros(16)

        def step() -> None:
            ops.wait_tensor(ops.all_gather_into_tensor(row, 2, group))
            local(x).sum().backward()
            ops.wait_tensor(ops.all_reduce(sums, "sum", group))
    for _ in range(WARM_UP):
        step()
    os.getppid()  # callgrind zeroes its counters here
    for _ in range(STEPS):
        step()
    os.getpgrp()  # and dumps them here
    dist.barrier()
    dist.destroy_process_group()


def _tag(run: int, mode: str) -> str:
    return f"run{run}-{mode.replace('+', '_')}"


def _run(folder: str, runs: int) -> None:
    """Both ranks of every (run, mode) under callgrind, one thread per output file."""
    for run in range(runs):
        for mode in MODES:
            tag = _tag(run, mode)
            with tempfile.TemporaryDirectory() as rendezvous:
                ranks = [subprocess.Popen(
                    ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--zero-before=getppid",
                     "--dump-before=getpgrp", f"--callgrind-out-file={folder}/{tag}.r{rank}.%p", sys.executable,
                     __file__, "--rank", str(rank), mode, f"file://{rendezvous}/init"],
                    env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for rank in (0, 1)]
                if any([process.wait() for process in ranks]):
                    raise SystemExit(f"a rank of {tag} failed: rerun it by hand to see why")


def _per_step(folder: str, run: int, mode: str, rank: int) -> float:
    """The calling thread's count in the dump of the counted steps (callgrind's .1-01 file): its
    `summary:`, the instructions executed. (Its `totals:` adds the inclusive cost of the calls still
    running at the dump, the interpreter's frames around the steps, once more.)"""
    (path,) = glob.glob(os.path.join(folder, f"{_tag(run, mode)}.r{rank}.*.1-01"))
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("summary:")) / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of the whole measurement (default 3)")
    parser.add_argument("--read", metavar="DIR", help="read the callgrind outputs of an earlier run from DIR")
    parser.add_argument("--json", default=os.path.join(RESULTS, "sync-instructions-cpu.json"))
    parser.add_argument("--rank", nargs=3, help=argparse.SUPPRESS)  # rank, mode, init method
    args = parser.parse_args()
    if args.rank:
        rank, mode, init_method = args.rank
        return _rank(int(rank), mode, init_method)
    folder = args.read or tempfile.mkdtemp(prefix="sync-instructions-")
    if not args.read:
        _run(folder, args.runs)
    runs = len(glob.glob(os.path.join(folder, f"run*-{MODES[0]}.r0.*.1-01")))
    if not runs:
        raise SystemExit(f"{folder} holds no counted steps of this script's runs (--runs must be at least 1)")
    per_run = [{mode: [_per_step(folder, run, mode, rank) for rank in (0, 1)] for mode in MODES}
               for run in range(runs)]
    beyond = [[s - c for s, c in zip(r["sync"], r["local+collectives"])] for r in per_run]
    median_beyond = [statistics.median(b[rank] for b in beyond) for rank in (0, 1)]
    result = {"format": "torch_safebn.sync_instructions/2", "created": datetime.now(timezone.utc).isoformat(),
              "machine": machine_block(torch.device("cpu"), 1), "world_size": 2, "backend": "gloo",
              "shape": [16, 8, 2, 2], "pass": "training forward + backward", "warm_up_steps": WARM_UP,
              "steps": STEPS, "runs": runs, "instructions_per_step_by_run_and_rank": per_run,
              "sync_beyond_local_and_collectives_by_run_and_rank": beyond,
              "median_sync_beyond_local_and_collectives_by_rank": median_beyond, "callgrind_outputs": folder}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print("calling thread's instructions per training step (callgrind), rank 0 / rank 1:")
    for run, (counts, gap) in enumerate(zip(per_run, beyond)):
        print(f"  run {run}: " + "   ".join(f"{mode} {c[0]:.0f} / {c[1]:.0f}" for mode, c in counts.items())
              + f"   sync - (local+collectives) {gap[0]:+.0f} / {gap[1]:+.0f}")
    print(f"  median of sync - (local+collectives): {median_beyond[0]:+.0f} / {median_beyond[1]:+.0f}")


if __name__ == "__main__":
    main()
