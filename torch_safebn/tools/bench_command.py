"""`torch-safebn bench`: its options, and the benchmark they choose (DESCRIPTION).
Options left out take the chosen benchmark's defaults; an option that does not
apply to it is an error rather than ignored."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import sys

import torch

from . import host_bench, layer_bench, model_bench
from .text import WIDTH

__all__ = ["DESCRIPTION", "add_options", "run"]

DESCRIPTION = """\
Time torch_safebn against native batch norm, one of three ways:

  --preset quick|resnet50|full, --shapes   layers: each pass of each shape (table, JSON, PNG)
  --preset host                            the host's cost per call, on tiny tensors (table, JSON)
  --model NAME                             a whole model's training step (table, JSON, PNG)

Every implementation is timed in turns with its peers in the same run, and results state their
speed-up over the fastest peer. benchmarks/README.md says what each one measures."""

HOST_PRESET = "host"
# Per benchmark, the defaults of the options it takes (as typed on the command line).
DEFAULTS = {
    "layer": {"dtypes": "float32,bfloat16", "layouts": ",".join(layer_bench.LAYOUTS),
              "passes": ",".join(layer_bench.ACTIVATION_PASSES), "min_run_time": 0.2},
    "host": {"dtypes": "float32", "layouts": "contiguous", "passes": ",".join(host_bench.PASSES),
             "threads": host_bench.DEFAULT_THREADS, "min_run_time": host_bench.DEFAULT_MIN_RUN_TIME},
    "model": {"dtypes": "float32", "layouts": "contiguous", "variants": ",".join(model_bench.VARIANTS),
              "batch_size": 32, "image_size": 224, "min_run_time": model_bench.DEFAULT_MIN_RUN_TIME},
}
LAYER_ONLY = ("passes", "peers")  # options of the layer and host benchmarks
MODEL_ONLY = ("batch_size", "image_size", "variants")


def _list(convert=str):
    """An argparse type for comma-separated values."""

    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_options(bench: argparse.ArgumentParser) -> None:
    threads = torch.get_num_threads()
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    what = bench.add_argument_group("what to time (one of; default: --preset quick)")
    choice = what.add_mutually_exclusive_group()
    choice.add_argument("--preset", choices=[*layer_bench.PRESETS, HOST_PRESET],
                        help="quick, resnet50, full: named lists of layer shapes; host: the per-call host cost on "
                             f"tiny tensors ({', '.join('x'.join(map(str, s)) for s in host_bench.SHAPES)}) "
                             "against nn.BatchNorm, 1 thread")
    choice.add_argument("--shapes", type=_list(layer_bench.parse_shape), metavar="NxCx...[,...]",
                        help="layer shapes instead of a preset, e.g. 32x64x56x56,8192x512")
    choice.add_argument("--model", metavar="NAME",
                        help="a whole model's training step, native and converted: a torchvision classification "
                             "model (resnet50) or timm:<name> (timm:efficientnet_b0); needs torch_safebn[models]")

    common = bench.add_argument_group("options of every benchmark")
    common.add_argument("--device", default=default_device, help=f"cpu or cuda (default: {default_device})")
    common.add_argument("--threads", type=_positive_int,
                        help=f"torch threads while timing (default: {host_bench.DEFAULT_THREADS} for --preset host, "
                             f"else {threads})")
    common.add_argument("--dtypes", type=_list(layer_bench.parse_dtype), metavar="INPUT[/PARAM],...",
                        help="input dtypes, optionally with the parameters' dtype; bfloat16 and float16 get float32 "
                             "parameters unless told (as under autocast; for --model, bfloat16 trains under "
                             "torch.autocast and bfloat16/bfloat16 casts the model) (default: float32,bfloat16; "
                             "float32 for --preset host and --model)")
    common.add_argument("--layouts", type=_list(),
                        help="contiguous and/or channels_last; for layers, channels_last applies to 4-D and 5-D "
                             "shapes (default: both; contiguous for --preset host and --model)")
    common.add_argument("--min-run-time", type=float, metavar="SECONDS",
                        help="timed seconds per implementation and workload at the least (default: 0.2; "
                             f"{host_bench.DEFAULT_MIN_RUN_TIME:g} for --preset host, "
                             f"{model_bench.DEFAULT_MIN_RUN_TIME:g} for --model)")
    common.add_argument("--json", metavar="PATH", help="write the result as JSON")
    common.add_argument("--plot", metavar="PATH", help="write a PNG of the result (not for --preset host)")

    layer = bench.add_argument_group("layer and host options")
    layer.add_argument("--passes", type=_list(),
                       help="fwd, bwd, fwdbwd, eval (default: all; fwd,fwdbwd,eval for --preset host)")
    layer.add_argument("--peers", type=_list(), metavar="PEER,...",
                       help=f"what to compare with: {', '.join(layer_bench.PEERS)}, or none (default: "
                            f"{', '.join(layer_bench.DEFAULT_PEERS)} where the device has them; "
                            f"{', '.join(host_bench.DEFAULT_PEERS)} for --preset host)")

    model = bench.add_argument_group("model options (--model)")
    model.add_argument("--batch-size", type=_positive_int, help="images per training step (default: 32)")
    model.add_argument("--image-size", type=_positive_int, metavar="PIXELS",
                       help="height and width of the images (default: 224)")
    model.add_argument("--variants", type=_list(),
                       help="eager and/or compile (torch.compile of the model; compilation is not timed) "
                            "(default: both)")
    bench.set_defaults(run=run)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"torch-safebn bench: {message}")


def _benchmark(args: argparse.Namespace) -> str:
    """"layer", "host" or "model", with the options left out given that benchmark's defaults."""
    kind = "model" if args.model else "host" if args.preset == HOST_PRESET else "layer"
    not_for = LAYER_ONLY if kind == "model" else MODEL_ONLY
    given = [f"--{name.replace('_', '-')}" for name in not_for if getattr(args, name) is not None]
    if given:
        raise _fail(f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to the {kind} benchmark")
    if kind == "host" and args.plot:
        raise _fail("the host benchmark draws no plot (its table and --json hold its results)")
    parsers = {"dtypes": _list(layer_bench.parse_dtype), "layouts": _list(), "passes": _list(), "variants": _list()}
    for name, default in DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, parsers[name](default) if name in parsers else default)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    return kind


def _peers(names: list[str] | None, device_type: str, defaults: tuple[str, ...]) -> list[layer_bench.Implementation]:
    if names is None:
        return [layer_bench.PEERS[name] for name in defaults if device_type in layer_bench.PEERS[name].device_types]
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


def _progress_bar(total: float, unit: str, **options):
    from tqdm import tqdm

    # A fixed width: the bar's postfix names the workload, and a line must not wrap.
    return tqdm(total=total, unit=unit, file=sys.stderr, ncols=min(WIDTH, shutil.get_terminal_size().columns),
                **options)


def run(args: argparse.Namespace) -> int:
    kind = _benchmark(args)
    if importlib.util.find_spec("tqdm") is None or (args.plot and importlib.util.find_spec("matplotlib") is None):
        raise _fail("needs tqdm (and matplotlib for --plot): pip install 'torch_safebn[bench]'")
    device = _device(args.device)
    result, table, plot = _run_model(args, device) if kind == "model" else _run_workloads(args, device, kind)
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        layer_bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_workloads(args: argparse.Namespace, device: torch.device, kind: str):
    """The layer or the host benchmark: (result, table function, plot function)."""
    from .layer_table import format_table

    host = kind == "host"
    shapes = host_bench.SHAPES if host else args.shapes or layer_bench.PRESETS[args.preset or "quick"]
    try:
        plan = layer_bench.workloads(shapes, args.layouts, args.dtypes, args.passes)
    except ValueError as error:
        raise _fail(str(error)) from None
    module = host_bench if host else layer_bench
    implementations = [layer_bench.SAFEBN, layer_bench.SAFEBN_NOCHECKS,
                       *_peers(args.peers, device.type, module.DEFAULT_PEERS)]
    with _progress_bar(len(plan) * len(implementations), "row") as bar:

        def on_measured(workload, impl):
            bar.set_postfix_str(f"{workload.label()} {impl.name}", refresh=False)
            bar.update()

        result = module.run(plan, implementations, device, args.threads, args.min_run_time, on_measured)
    return result, functools.partial(format_table, title="Host time per call" if host else "Layer benchmark"), _layer_plot


def _layer_plot(result: dict, path: str) -> None:
    from .layer_plot import plot_speedups

    plot_speedups(result, path)


def _run_model(args: argparse.Namespace, device: torch.device):
    """The model benchmark: (result, table function, plot function)."""
    from .model_plot import plot_model
    from .model_table import format_table

    try:
        plan = model_bench.configs(args.variants, args.layouts, args.dtypes)
        model = model_bench.create_model(args.model)
    except (ValueError, model_bench.NotInstalled) as error:
        raise _fail(str(error)) from None
    per_impl = args.min_run_time  # the bar counts timed seconds, each implementation's share capped
    # No count or rate: seconds timed per second are no measure of progress anyone needs.
    impls = [model_bench.impls_for(config) for config in plan]
    with _progress_bar(sum(map(len, impls)) * per_impl, "s",
                       bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]") as bar:
        timed = [[0.0] * len(config_impls) for config_impls in impls]

        def on_phase(text: str) -> None:
            bar.set_postfix_str(text)

        def on_timed(config: int, impl: int, seconds: float) -> None:
            share = min(seconds, per_impl - timed[config][impl])
            timed[config][impl] += share
            bar.update(share)

        result = model_bench.run(args.model, model, plan, device, args.threads, args.batch_size, args.image_size,
                                 args.min_run_time, on_phase=on_phase, on_timed=on_timed)
    return result, format_table, plot_model
