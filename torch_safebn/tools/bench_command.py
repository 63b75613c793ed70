"""`torch-safebn bench`: its options, and the layer benchmark they run (DESCRIPTION)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys

import torch

from . import layer_bench
from .text import WIDTH

__all__ = ["DESCRIPTION", "add_options", "run"]

DESCRIPTION = """\
Time torch_safebn against native batch norm, layer by layer: each pass of each shape of a preset or
of --shapes (table, JSON, PNG).

Every implementation is timed in turns with its peers in the same run, and results state their
speed-up over the fastest peer. benchmarks/README.md says what is measured."""


def _list(convert=str):
    """An argparse type for comma-separated values."""

    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_options(bench: argparse.ArgumentParser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = bench.add_mutually_exclusive_group()
    shapes.add_argument("--preset", choices=sorted(layer_bench.PRESETS), default="quick",
                        help="named list of shapes (default: quick)")
    shapes.add_argument("--shapes", type=_list(layer_bench.parse_shape), metavar="NxCx...[,...]",
                        help="explicit shapes instead of a preset, e.g. 32x64x56x56,8192x512")
    bench.add_argument("--device", default=default_device, help=f"cpu or cuda (default: {default_device})")
    bench.add_argument("--dtypes", type=_list(layer_bench.parse_dtype), default="float32,bfloat16",
                       metavar="INPUT[/PARAM],...",
                       help="input dtypes, optionally with the parameters' dtype; half and bfloat16 input gets "
                            "float32 parameters unless told (default: float32,bfloat16)")
    bench.add_argument("--layouts", type=_list(), default=",".join(layer_bench.LAYOUTS),
                       help="contiguous and/or channels_last; channels_last applies to 4-D and 5-D shapes "
                            "(default: both)")
    bench.add_argument("--passes", type=_list(), default=",".join(layer_bench.ACTIVATION_PASSES),
                       help="fwd, bwd, fwdbwd, eval (default: all)")
    bench.add_argument("--peers", type=_list(), default=None, metavar="PEER,...",
                       help=f"what to compare with: {', '.join(layer_bench.PEERS)}, or none "
                            "(default: every peer the device has)")
    bench.add_argument("--threads", type=int, default=torch.get_num_threads(),
                       help=f"torch threads while timing (default: {torch.get_num_threads()})")
    bench.add_argument("--min-run-time", type=float, default=0.2, metavar="SECONDS",
                       help="timed seconds per row at the least (default: 0.2)")
    bench.add_argument("--json", metavar="PATH", help="write the result as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of the speed-ups")
    bench.set_defaults(run=run)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"torch-safebn bench: {message}")


def _peers(names: list[str] | None, device_type: str) -> list[layer_bench.Implementation]:
    if names is None:
        return [layer_bench.PEERS[name] for name in layer_bench.DEFAULT_PEERS
                if device_type in layer_bench.PEERS[name].device_types]
    if names == ["none"]:
        return []
    for name in names:
        if name not in layer_bench.PEERS:
            raise _fail(f"unknown peer {name!r}; choose from {', '.join(layer_bench.PEERS)}, or none")
        if device_type not in layer_bench.PEERS[name].device_types:
            raise _fail(f"{name} runs on {', '.join(layer_bench.PEERS[name].device_types)} only")
    return [layer_bench.PEERS[name] for name in names]


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise _fail(f"{name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _fail("--device cuda, but torch sees no GPU")
    return device


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("tqdm") is None or (args.plot and importlib.util.find_spec("matplotlib") is None):
        raise _fail("needs tqdm (and matplotlib for --plot): pip install 'torch_safebn[bench]'")
    from tqdm import tqdm

    from .layer_table import format_table

    device = _device(args.device)
    shapes = args.shapes or layer_bench.PRESETS[args.preset]
    try:
        plan = layer_bench.workloads(shapes, args.layouts, args.dtypes, args.passes)
    except ValueError as error:
        raise _fail(str(error)) from None
    implementations = [layer_bench.SAFEBN, layer_bench.SAFEBN_NOCHECKS, *_peers(args.peers, device.type)]
    # A fixed width: the bar's postfix names the workload, and a line must not wrap.
    columns = min(WIDTH, shutil.get_terminal_size().columns)
    with tqdm(total=len(plan) * len(implementations), unit="row", file=sys.stderr, ncols=columns) as bar:

        def on_measured(workload, impl):
            bar.set_postfix_str(f"{workload.label()} {impl.name}", refresh=False)
            bar.update()

        result = layer_bench.run(plan, implementations, device, args.threads, args.min_run_time, on_measured)
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        layer_bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from .layer_plot import plot_speedups

        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_speedups(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
