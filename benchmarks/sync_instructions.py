"""SafeSyncBatchNorm's host cost in instructions, which, unlike the clocks of
sync_host.py, do not move from run to run: each of 2 gloo ranks runs under
valgrind's callgrind, 30 warm-up training steps on [16, 8, 2, 2] and then K
more; the calling thread's instructions per step are the difference between
K = 200 and K = 0, divided by 200. Two implementations, as sync_host.py's:

  sync               SafeSyncBatchNorm2d
  local+collectives  SafeBatchNorm2d with the all_gather of a row and the
                     all_reduce of 2C sums around it, as functional collectives

PYTHONHASHSEED is fixed, so that Python's dictionaries (and their lookups) are
the same in every run. Four runs of both ranks under valgrind, about 13 minutes on 2 cores:

    python benchmarks/sync_instructions.py            # runs them, then reads them
    python benchmarks/sync_instructions.py --read DIR  # reads the outputs of an earlier run

writes benchmarks/results/sync-instructions-cpu.json and prints the counts.
"""
import argparse
import glob
import json
import os
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


def _rank(rank: int, mode: str, steps: int, init_method: str) -> None:
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
    for _ in range(WARM_UP + steps):
        step()
    dist.barrier()
    dist.destroy_process_group()


def _run(folder: str) -> None:
    """Both ranks of every (mode, K) under callgrind, one thread per output file."""
    for mode in MODES:
        for steps in (0, STEPS):
            tag = f"{mode.replace('+', '_')}-{steps}"
            with tempfile.TemporaryDirectory() as rendezvous:
                ranks = [subprocess.Popen(
                    ["valgrind", "--tool=callgrind", "--separate-threads=yes",
                     f"--callgrind-out-file={folder}/{tag}.r{rank}.%p", sys.executable, __file__, "--rank",
                     str(rank), mode, str(steps), f"file://{rendezvous}/init"],
                    env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for rank in (0, 1)]
                if any([process.wait() for process in ranks]):
                    raise SystemExit(f"a rank of {tag} failed: rerun it by hand to see why")


def _main_thread_instructions(folder: str, tag: str, rank: int) -> int:
    """The `totals:` line of the calling thread's output (callgrind's -01 file)."""
    (path,) = glob.glob(os.path.join(folder, f"{tag}.r{rank}.*-01"))
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("totals:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read", metavar="DIR", help="read the callgrind outputs of an earlier run from DIR")
    parser.add_argument("--json", default=os.path.join(RESULTS, "sync-instructions-cpu.json"))
    parser.add_argument("--rank", nargs=4, help=argparse.SUPPRESS)  # rank, mode, steps, init method
    args = parser.parse_args()
    if args.rank:
        rank, mode, steps, init_method = args.rank
        return _rank(int(rank), mode, int(steps), init_method)
    folder = args.read or tempfile.mkdtemp(prefix="sync-instructions-")
    if not args.read:
        _run(folder)
    per_step = {mode: [(_main_thread_instructions(folder, f"{mode.replace('+', '_')}-{STEPS}", rank)
                        - _main_thread_instructions(folder, f"{mode.replace('+', '_')}-0", rank)) / STEPS
                       for rank in (0, 1)] for mode in MODES}
    beyond = [s - c for s, c in zip(per_step["sync"], per_step["local+collectives"])]
    result = {"format": "torch_safebn.sync_instructions/1", "created": datetime.now(timezone.utc).isoformat(),
              "machine": machine_block(torch.device("cpu"), 1), "world_size": 2, "backend": "gloo",
              "shape": [16, 8, 2, 2], "pass": "training forward + backward", "warm_up_steps": WARM_UP,
              "steps": STEPS, "instructions_per_step_by_rank": per_step,
              "sync_beyond_local_and_collectives_by_rank": beyond, "callgrind_outputs": folder}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print("calling thread's instructions per training step (callgrind), rank 0 / rank 1:")
    for mode, counts in per_step.items():
        print(f"  {mode:17} {counts[0]:10.0f} {counts[1]:10.0f}")
    print(f"  sync - (local+collectives): {beyond[0]:+.0f} / {beyond[1]:+.0f}")


if __name__ == "__main__":
    main()
