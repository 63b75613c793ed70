"""Whole models on the CPU: torchvision's resnet18, timm's efficientnet_b0 and mobilenetv3_large_100,
training steps at batch 8 on 96 x 96 images, native and converted, eager and torch.compile, float32,
2 threads set explicitly. Every model is timed --runs times (default 3), one after another, because
one run's ratio says little on a machine whose clock moves between runs. About 10 minutes a run on
2 cores, most of it inductor compiling (its cache makes the later runs quicker).

    python benchmarks/model_suite.py [--runs N] [more bench options, e.g. --min-run-time 20]

writes benchmarks/results/model-NAME-cpu.json and .png for each model's first run,
model-NAME-cpu-runK.json for the others, and model-suite-cpu.json: every run's median and
converted / native ratio per model and variant. It prints each run's table, then the ratios.
"""
import argparse
import json
import os
import sys
from datetime import datetime, timezone

from torch_safebn.tools.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

MODELS = {  # --model: file name
    "resnet18": "resnet18",
    "timm:efficientnet_b0": "efficientnet_b0",
    "timm:mobilenetv3_large_100": "mobilenetv3_large_100",
}


def result_path(model: str, run: int) -> str:
    return os.path.join(RESULTS, f"model-{MODELS[model]}-cpu" + ("" if run == 1 else f"-run{run}"))


def options(model: str, run: int) -> list[str]:
    path = result_path(model, run)
    plot = ["--plot", f"{path}.png"] if run == 1 else []
    return ["bench", "--model", model, "--device", "cpu", "--threads", "2", "--batch-size", "8",
            "--image-size", "96", "--variants", "eager,compile", "--dtypes", "float32",
            "--json", f"{path}.json", *plot]


def ratios(model: str, run: int) -> dict:
    """Each variant's median per implementation, and its time over native's."""
    with open(result_path(model, run) + ".json") as f:
        result = json.load(f)
    summary = {}
    for variant in sorted({row["variant"] for row in result["rows"]}):
        medians = {row["impl"]: row["median_ms"] for row in result["rows"] if row["variant"] == variant}
        summary[variant] = {"median_ms": medians,
                            "over_native": {impl: ms / medians["native"] for impl, ms in medians.items()}}
    return {"machine": result["machine"], "created": result["created"], "variants": summary}


def report(runs: int) -> dict:
    suite = {"format": "torch_safebn.model_suite/1", "created": datetime.now(timezone.utc).isoformat(),
             "over_native": "an implementation's median / native's, same variant, same run (under 1: faster)",
             "models": {model: [ratios(model, run) for run in range(1, runs + 1)] for model in MODELS}}
    print("\nover native, every run: eager converted; compiled converted, compiled converted-kernels")
    for model, results in suite["models"].items():
        cells = ["{:.3f}; {:.3f}, {:.3f}".format(r["variants"]["eager"]["over_native"]["converted"],
                                                 r["variants"]["compile"]["over_native"]["converted"],
                                                 r["variants"]["compile"]["over_native"]["converted-kernels"])
                 for r in results]
        print(f"  {model:28} " + "   ".join(cells))
    return suite


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--runs", type=int, default=3)
    args, more = parser.parse_known_args()
    status = 0
    for run in range(1, args.runs + 1):
        for model in MODELS:
            status = max(status, main(options(model, run) + more))  # later options override these
    if status == 0:
        with open(os.path.join(RESULTS, "model-suite-cpu.json"), "w") as f:
            json.dump(report(args.runs), f, indent=1)
    sys.exit(status)
