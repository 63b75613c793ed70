"""Which compiled batch norms should keep the fused kernels: a compiled training step of a small block
(1x1 convolution, batch norm + activation, 1x1 convolution), native against torch_safebn lowered to
ATen ops and torch_safebn with its fused ops kept, per shape, timed in turns in one process. The
shapes are efficientnet's and resnet's at 96 x 96 and 224 x 224, ordered by values per channel (N times
the spatial size), which torch_safebn.lowering.KERNELS_FROM_VALUES_PER_CHANNEL divides at.

    python benchmarks/compiled_choice.py [--runs 3] [--min-run-time 2] [--threads 2]

writes benchmarks/results/compiled-choice-cpu.json and prints, per shape and run, each
implementation's median over native's and which of the two torch_safebn paths was faster.
"""
import argparse
import copy
import json
import math
import os
import statistics
from datetime import datetime, timezone

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d

import torch_safebn
from torch_safebn import lowering
from torch_safebn.tools.machine import machine_block
from torch_safebn.tools.timing import time_in_turns

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# efficientnet's batch norm + SiLU is timm's BatchNormAct2d (converted: the activation fused into the
# safebn op); resnet's is nn.BatchNorm2d then nn.ReLU (converted: the batch norm alone).
NORMS = {"silu": lambda c: BatchNormAct2d(c, act_layer=nn.SiLU), "relu": lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())}
SHAPES = [  # N, C, H (= W)
    (8, 1152, 3), (8, 672, 6), (8, 240, 12), (8, 192, 16), (8, 144, 24), (8, 64, 32), (8, 96, 48),
    (32, 64, 56), (8, 32, 112),
]


class Block(nn.Module):
    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.expand = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = NORMS[activation](channels)
        self.project = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x):
        return self.project(self.norm(self.expand(x)))


def kept_from(values: float):
    """A step run with compiled code keeping the fused kernels from `values` per channel on the CPU."""
    def wrap(step):
        def run():
            with lowering.kernels_from("cpu", values):
                step()
        return run
    return wrap


def training_step(model: nn.Module, x: torch.Tensor):
    compiled = torch.compile(model)

    def step():
        compiled(x).sum().backward()
        for p in model.parameters():
            p.grad = None
    return step


def measure(shape, activation: str, min_run_time: float, threads: int) -> dict:
    n, c, h = shape
    torch.manual_seed(0)
    native = Block(c, activation)
    x = torch.randn(n, c, h, h).to(memory_format=torch.channels_last)
    native = native.to(memory_format=torch.channels_last)
    converted = torch_safebn.convert_model(copy.deepcopy(native))
    impls = {
        "native": training_step(native, x),
        "lowered": kept_from(math.inf)(training_step(converted, x)),
        "kernels": kept_from(0)(training_step(copy.deepcopy(converted), x)),
    }
    torch._dynamo.reset()
    times = time_in_turns(list(impls.values()), threads, min_run_time)
    medians = {name: t.median * 1e3 for name, t in zip(impls, times)}
    return {"shape": list(shape), "values_per_channel": n * h * h, "activation": activation, "median_ms": medians,
            "over_native": {name: ms / medians["native"] for name, ms in medians.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=os.path.join(RESULTS, "compiled-choice-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for run in range(1, args.runs + 1):
        rows = []
        for shape in SHAPES:
            for activation in NORMS:
                row = measure(shape, activation, args.min_run_time, args.threads)
                rows.append(row)
                r = row["over_native"]
                print(f"run {run} {str(shape):16s} {row['values_per_channel']:7d} values/channel {activation:4s} "
                      f"native {row['median_ms']['native']:8.3f} ms  lowered {r['lowered']:.3f}  "
                      f"kernels {r['kernels']:.3f}  faster: {'kernels' if r['kernels'] < r['lowered'] else 'lowered'}",
                      flush=True)
        runs.append(rows)
    result = {"format": "torch_safebn.compiled_choice/1", "created": datetime.now(timezone.utc).isoformat(),
              "machine": machine_block(torch.device("cpu"), args.threads),
              "settings": {"threads": args.threads, "min_run_time_s": args.min_run_time, "layout": "channels_last",
                           "dtype": "float32", "step": "compiled block(x).sum().backward()"},
              "kernels_from_values_per_channel": lowering.KERNELS_FROM_VALUES_PER_CHANNEL["cpu"],
              "runs": runs}
    print("\nmedian over runs, kernels / lowered (under 1: the fused kernels faster):")
    for i, row in enumerate(runs[0]):
        ratio = statistics.median(r[i]["over_native"]["kernels"] / r[i]["over_native"]["lowered"] for r in runs)
        print(f"  {str(row['shape']):16s} {row['values_per_channel']:7d} {row['activation']:4s} {ratio:.3f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
