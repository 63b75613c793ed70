"""`torch-safebn` (also `python -m torch_safebn`):

  info   what is installed: versions, backend, kernels, CPU, threads, GPU
  check  self-test on every available device; exits non-zero on any failure
  bench  time torch_safebn against native batch norm (table, --json, --plot)
  demo   the motivating example (torch_safebn.tools.demo)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand and returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo parses its own options, --help included
        return _demo(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-safebn", description="torch_safebn: batch norm that cannot be "
                                     "silently poisoned. Inspect the install, self-test it, benchmark it.")
    commands = parser.add_subparsers(dest="command", metavar="{info,check,bench,demo}")

    commands.add_parser("info", help="versions, backend, kernels, CPU, threads, GPU").set_defaults(run=_info)
    commands.add_parser(
        "check", help="parity with nn.BatchNorm, gradcheck and opcheck on every available device"
    ).set_defaults(run=_check)

    bench = commands.add_parser("bench", help="time torch_safebn against native batch norm")
    _add_bench_options(bench)
    bench.set_defaults(run=_bench)

    # Listed for the help only: main() hands `demo ...` to the demo before parsing.
    commands.add_parser("demo", help="the motivating example, with and without torch_safebn", add_help=False)
    return parser


# -- info ----------------------------------------------------------------------------------
def _info(args) -> int:
    from torch_safebn import __version__, backend

    from .layer_bench import device_name

    # backend() is "cuda+cpu" exactly when the extension registered CUDA kernels for the ops.
    has_cuda_kernels = backend() == "cuda+cpu"
    lines = {
        "torch_safebn": __version__,
        "torch": torch.__version__,
        "backend": backend(),
        "safebn CUDA kernels": "registered" if has_cuda_kernels else "not registered",
        "torch CUDA": torch.version.cuda or "none (CPU-only torch)",
        "torch CUDA archs": " ".join(torch.cuda.get_arch_list()) or "none",
        "CPU": f"{device_name(torch.device('cpu'))}, capability {torch.backends.cpu.get_cpu_capability()}",
        "threads": str(torch.get_num_threads()),
        "GPU": device_name(torch.device("cuda")) if torch.cuda.is_available() else "none",
    }
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


# -- check ---------------------------------------------------------------------------------
def _check(args) -> int:
    from . import selfcheck

    return selfcheck.main()


# -- bench ---------------------------------------------------------------------------------
def _list(convert=str):
    """An argparse type for comma-separated values."""

    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_bench_options(bench: argparse.ArgumentParser) -> None:
    from . import layer_bench

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


def _peers(names: list[str] | None, device_type: str):
    from .layer_bench import PEERS

    if names is None:
        return [peer for peer in PEERS.values() if device_type in peer.device_types]
    if names == ["none"]:
        return []
    for name in names:
        if name not in PEERS:
            raise SystemExit(f"torch-safebn bench: unknown peer {name!r}; choose from {', '.join(PEERS)}, or none")
        if device_type not in PEERS[name].device_types:
            raise SystemExit(f"torch-safebn bench: {name} runs on {', '.join(PEERS[name].device_types)} only")
    return [PEERS[name] for name in names]


def _bench_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"torch-safebn bench: {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch-safebn bench: --device cuda, but torch sees no GPU")
    return device


def _bench(args) -> int:
    if importlib.util.find_spec("tqdm") is None or (args.plot and importlib.util.find_spec("matplotlib") is None):
        raise SystemExit("torch-safebn bench needs tqdm (and matplotlib for --plot): pip install 'torch_safebn[bench]'")
    from tqdm import tqdm

    from . import layer_bench
    from .layer_table import format_table

    device = _bench_device(args.device)
    shapes = args.shapes or layer_bench.PRESETS[args.preset]
    try:
        plan = layer_bench.workloads(shapes, args.layouts, args.dtypes, args.passes)
        implementations = [layer_bench.SAFEBN, layer_bench.SAFEBN_NOCHECKS, *_peers(args.peers, device.type)]
    except ValueError as error:
        raise SystemExit(f"torch-safebn bench: {error}") from None
    with tqdm(total=len(plan) * len(implementations), unit="row", file=sys.stderr, dynamic_ncols=True) as bar:

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


# -- demo ----------------------------------------------------------------------------------
def _demo(argv: list[str]) -> int:
    from . import demo  # imported here: it is not needed by the other subcommands

    return demo.main(argv)
