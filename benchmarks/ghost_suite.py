"""Ghost batch norm's price: SafeBatchNorm2d's training forward + backward with
virtual_batch_size=k against the same module without it, on the same input,
timed in turns (torch_safebn/tools/timing.py), on the CPU, 2 threads, float32,
both layouts, and against native nn.BatchNorm2d. The chunks are normalized in
the fused kernels; this says what the per-chunk statistics cost.

    python benchmarks/ghost_suite.py [--shape 64x64x56x56] [--k 16] [--min-run-time 5] [--repeat 3]

writes benchmarks/results/ghost-cpu.json and prints every run's medians and ratio.
"""
import argparse
import json
import os
import statistics
from datetime import datetime, timezone

import torch

import torch_safebn
from torch_safebn.tools.machine import machine_block, torch_threads
from torch_safebn.tools.timing import time_in_turns

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
THREADS = 2
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def training_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step() -> None:
        x.grad = None
        module(x).backward(dy)
    return step


def run_once(shape: list[int], k: int, layout: str, min_run_time: float) -> dict:
    x = torch.randn(shape).to(memory_format=LAYOUTS[layout]).requires_grad_()
    dy = torch.randn(shape).to(memory_format=LAYOUTS[layout])
    channels = shape[1]
    impls = {"plain": torch_safebn.SafeBatchNorm2d(channels),
             f"ghost k={k}": torch_safebn.SafeBatchNorm2d(channels, virtual_batch_size=k),
             "native": torch.nn.BatchNorm2d(channels)}
    measured = time_in_turns([training_step(m, x, dy) for m in impls.values()], THREADS, min_run_time)
    median_ms = {name: m.median * 1e3 for name, m in zip(impls, measured)}
    return {"layout": layout, "median_ms": median_ms,
            "ghost_over_plain": median_ms[f"ghost k={k}"] / median_ms["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64x64x56x56")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--min-run-time", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(RESULTS, "ghost-cpu.json"))
    args = parser.parse_args()
    shape = [int(n) for n in args.shape.split("x")]
    with torch_threads(THREADS):
        runs = [run_once(shape, args.k, layout, args.min_run_time)
                for _ in range(args.repeat) for layout in LAYOUTS]
    result = {"format": "torch_safebn.ghost/1", "created": datetime.now(timezone.utc).isoformat(),
              "machine": machine_block(torch.device("cpu"), THREADS), "shape": shape, "virtual_batch_size": args.k,
              "pass": "training forward + backward", "min_run_time_s": args.min_run_time, "runs": runs}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['machine']['device']}, {THREADS} threads, {shape} float32, forward + backward (ms):")
    for run in runs:
        cells = "  ".join(f"{name} {ms:.2f}" for name, ms in run["median_ms"].items())
        print(f"  {run['layout']:13} {cells}  ghost / plain {run['ghost_over_plain']:.3f}")
    for layout in LAYOUTS:
        ratios = [run["ghost_over_plain"] for run in runs if run["layout"] == layout]
        print(f"  {layout}: ghost / plain median {statistics.median(ratios):.3f} over {len(ratios)} runs")


if __name__ == "__main__":
    main()
