"""Issue 14's fused layer: batch norm + activation, forward + backward, against
nn.BatchNorm2d followed by the native activation, eager and under
torch.compile (inductor fuses the two), timed in turns. [32, 64, 56, 56],
relu and silu, float32 and bfloat16 input (float32 parameters, as under
autocast), contiguous and channels_last. About 5 minutes on 2 cores, most of
it inductor compiling.

    python benchmarks/fused_suite.py [--device cpu] [--threads 2] [--min-run-time 1]

writes benchmarks/results/fused-<device>.json and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os

import torch
from torch import nn

import torch_safebn
from torch_safebn.activations import activation_module
from torch_safebn.tools.text import format_time, render_table
from torch_safebn.tools.machine import machine_block, torch_threads
from torch_safebn.tools.timing import time_in_turns

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPE = (32, 64, 56, 56)
ACTIVATIONS = ("relu", "silu")
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
PEERS = ("native", "compile")


def implementations(act: str, device: torch.device) -> dict[str, nn.Module]:
    """The fused module and its peers, over the same parameters and buffers (each its own copy)."""
    native = nn.Sequential(nn.BatchNorm2d(SHAPE[1], device=device), activation_module(act))
    fused = torch_safebn.SafeBatchNormAct2d(SHAPE[1], act=act, device=device)
    fused.load_state_dict(native[0].state_dict())
    torch._dynamo.reset()  # a fresh compile per workload
    compiled = torch.compile(copy.deepcopy(native), dynamic=False)
    return {"safebn-fused": fused, "native": native, "compile": compiled}


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    wanted = [x, *module.parameters()]
    return lambda: torch.autograd.grad(module(x), wanted, grad)


def run(device: torch.device, threads: int, min_run_time: float) -> dict:
    rows = []
    with torch_threads(threads):
        for act, dtype, layout in itertools.product(ACTIVATIONS, DTYPES, LAYOUTS):
            x = torch.randn(SHAPE, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
            grad = torch.randn_like(x)
            modules = implementations(act, device)
            timed = time_in_turns([step(m, x.requires_grad_(), grad) for m in modules.values()], threads,
                                  min_run_time)
            medians = dict(zip(modules, (m.median for m in timed)))
            best_peer = min(medians[peer] for peer in PEERS)
            for impl, measurement in zip(modules, timed):
                rows.append({
                    "impl": impl, "act": act, "pass": "fwdbwd", "shape": list(SHAPE), "layout": layout,
                    "dtype": str(dtype).removeprefix("torch."), "param_dtype": "float32",
                    "median_us": measurement.median * 1e6, "iqr_us": measurement.iqr * 1e6,
                    "runs": len(measurement.times),
                    "speedup_vs_native": medians["native"] / measurement.median,
                    "speedup_vs_best_peer": best_peer / measurement.median,
                })
            print(f"{act} {rows[-1]['dtype']} {layout}: " + ", ".join(
                f"{impl} {median * 1e6:.0f} us" for impl, median in medians.items()), flush=True)
        machine = machine_block(device, threads)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"format": "torch_safebn.fused/1", "created": created, "machine": machine,
            "settings": {"min_run_time_s": min_run_time}, "rows": rows}


def table(result: dict) -> str:
    header = ["act", "dtype", "layout", "safebn-fused", "native", "compile", "vs native", "vs best peer"]
    lines = []
    rows = result["rows"]
    for i in range(0, len(rows), len(PEERS) + 1):
        group = {row["impl"]: row for row in rows[i:i + len(PEERS) + 1]}
        fused = group["safebn-fused"]
        lines.append([fused["act"], fused["dtype"], fused["layout"],
                      *(format_time(group[impl]["median_us"]) for impl in ("safebn-fused", *PEERS)),
                      f"{fused['speedup_vs_native']:.2f}x", f"{fused['speedup_vs_best_peer']:.2f}x"])
    machine = result["machine"]
    title = (f"Batch norm + activation, forward + backward, {'x'.join(map(str, SHAPE))}, medians; "
             f"{machine['device']}, {machine['threads']} threads, torch {machine['torch_version']}")
    return "\n".join([title, "", *render_table(header, lines, text_columns=(0, 1, 2))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="timed seconds per implementation")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = run(device, args.threads, args.min_run_time)
    with open(os.path.join(RESULTS, f"fused-{device.type}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
