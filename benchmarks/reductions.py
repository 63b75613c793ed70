"""The CPU reductions alone: safebn.batch_stats (the forward's statistics) and
safebn.backward_reduce (the gradient's two sums) per case, and for float32
native's gradient sums beside them (native_batch_norm_backward without the
input gradient, which computes the same two sums). A case's ops timed in
turns (torch_safebn.tools.timing), one thread unless told, in this process:
run it once per build to compare two builds (benchmarks/README.md "Running": from outside the
checkout, PYTHONPATH set to each build, the builds taking turns).

    python benchmarks/reductions.py [--threads 1] [--min-run-time 0.35] [--json PATH] SHAPE:LAYOUT:DTYPE ...
    e.g. 32x64x56x56:channels_last:float32 8192x512:contiguous:float32

prints one JSON object (the machine and build, the times in us); --json
appends it to PATH as a line.
"""
import argparse
import json

import torch

from torch_safebn.tools.layer_bench import parse_shape
from torch_safebn.tools.machine import machine_block
from torch_safebn.tools.timing import time_in_turns

OPS = torch.ops.safebn


def case_ops(spec: str) -> dict:
    """The ops to time for one SHAPE:LAYOUT:DTYPE."""
    shape, layout, dtype = spec.split(":")
    shape = parse_shape(shape)
    memory_format = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
    x, dy = (torch.randn(shape).to(getattr(torch, dtype), memory_format=memory_format) for _ in range(2))
    channels, dims = shape[1], [0, *range(2, len(shape))]
    weight, bias = torch.randn(channels), torch.randn(channels)
    mean, invstd = x.float().mean(dims), torch.ones(channels)
    ops = {"stats": lambda: OPS.batch_stats(x),
           "grad_sums": lambda: OPS.backward_reduce(dy, x, mean, invstd, weight, bias, [True, True], 0, 0.0)}
    if x.dtype == torch.float32:  # native's backward takes its statistics in the input's dtype
        ops["native_grad_sums"] = lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, 1e-5, [False, True, True])
    return ops


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", metavar="SHAPE:LAYOUT:DTYPE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.35, help="seconds of timed calls per op")
    parser.add_argument("--json", help="append the result to this file as a line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the machine block names the build timed (torch_safebn_build, torch_safebn_path)
    result = {"machine": machine_block(torch.device("cpu"), args.threads), "us": {}}
    for spec in args.cases:
        ops = case_ops(spec)
        for name, measurement in zip(ops, time_in_turns(list(ops.values()), args.threads, args.min_run_time)):
            result["us"][f"{name} {spec}"] = round(measurement.median * 1e6, 1)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
