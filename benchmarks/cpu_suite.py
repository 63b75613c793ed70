"""Issue 5's CPU suite: the `full` preset (float32 and bfloat16 input, contiguous
and channels_last, fwd / bwd / fwdbwd / eval) against native eager batch norm and
torch.compile, on 2 threads set explicitly. About 17 to 20 minutes on 2 cores for
each state of memory.

    python benchmarks/cpu_suite.py [--memory cold|warm|both] [--name NAME] [--runs N]
                                   [more bench options, e.g. --min-run-time 1]

Memory, because on large tensors it decides as much as the kernels do: glibc gives
a freed block of tens of MB back to the system, so the next call that allocates
one pays its page faults again. torch_safebn's outputs come from its own cache of
such blocks; native's and torch.compile's do not. "cold" runs as a user's process
does; "warm" keeps glibc from returning memory (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), so that every implementation reuses warm pages and the
kernels are compared alone. Default: both, one process each.

writes benchmarks/results/NAME.json and .png (cold), NAME-warm.json and .png
(warm), and prints the tables; NAME is full-cpu unless told (a run of part of
the suite, say --passes fwdbwd, should not overwrite the whole suite's).

--runs N (default 1) runs each state of memory N times, each run a process of
its own, because on a VM one process's ratios near the size of the last-level
cache can sit 30% from the next one's (where its pages landed decides how much
of a tensor the cache holds). Run k > 1 writes NAME[-warm]-runK.json and .png;
NAME[-warm]-runs.json then holds, per workload, safebn's time over the best
peer's in every run and their median, and per run and over the medians, the
workloads safebn was fastest in and the geometric mean.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone

from torch_safebn.tools.layer_bench import workload_groups, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# glibc reads these once, at start-up: a warm run is a process of its own.
WARM_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
MEMORY = {
    "cold": "glibc's defaults: freed large blocks go back to the system",
    "warm": "glibc keeps freed memory (" + ", ".join(f"{k}={v}" for k, v in WARM_MEMORY.items()) + ")",
}


def result_path(memory: str, name: str, index: int = 1) -> str:
    """Run `index`'s results, without the extension."""
    suffix = ("" if memory == "cold" else f"-{memory}") + ("" if index == 1 else f"-run{index}")
    return os.path.join(RESULTS, name + suffix)


def options(memory: str, name: str, index: int) -> list[str]:
    path = result_path(memory, name, index)
    return ["bench", "--device", "cpu", "--preset", "full",
            "--dtypes", "float32,bfloat16", "--layouts", "contiguous,channels_last",
            "--passes", "fwd,bwd,fwdbwd,eval", "--peers", "native,compile",
            "--threads", "2", "--min-run-time", "0.5",
            "--json", f"{path}.json", "--plot", f"{path}.png"]


def run_once(memory: str, name: str, index: int, more: list[str]) -> tuple[int, str]:
    """Run `index` of the suite, in a process of its own, its JSON stating the
    state of memory: (exit status, the JSON's path)."""
    env = dict(os.environ, **(WARM_MEMORY if memory == "warm" else {}))
    argv = options(memory, name, index) + more  # later options override these
    status = subprocess.call([sys.executable, "-m", "torch_safebn", *argv], env=env)
    path = argv[max(i for i, arg in enumerate(argv) if arg == "--json") + 1]  # the last one given
    if status == 0:
        with open(path) as f:
            result = json.load(f)
        result["memory"] = {"state": memory, "meaning": MEMORY[memory]}
        write_json(result, path)
    return status, path


def over_best_peer(path: str) -> dict[tuple, float]:
    """Per workload of a run timed against peers, safebn's time over the fastest peer's."""
    with open(path) as f:
        groups = workload_groups(json.load(f)["rows"])
    return {key: 1 / impls["safebn"]["speedup_vs_best_peer"] for key, impls in groups.items()
            if impls["safebn"]["speedup_vs_best_peer"]}


def verdict(ratios: list[float]) -> dict:
    """The workloads safebn was fastest in, and the geometric mean of its time over the best peer's."""
    geomean = math.exp(statistics.fmean(math.log(ratio) for ratio in ratios)) if ratios else None
    return {"fastest": sum(ratio <= 1.0 for ratio in ratios), "workloads": len(ratios),
            "geomean_over_best_peer": geomean}


def summarize(memory: str, paths: list[str]) -> dict:
    """Every run's ratios per workload, their medians (over the runs that timed
    the workload), and the verdict of each run and of the medians."""
    runs = [over_best_peer(path) for path in paths]
    keys = list(dict.fromkeys(key for run in runs for key in run))
    medians = {key: statistics.median(run[key] for run in runs if key in run) for key in keys}
    return {
        "format": "torch_safebn.cpu_suite_runs/1", "created": datetime.now(timezone.utc).isoformat(),
        "memory": {"state": memory, "meaning": MEMORY[memory]},
        "over_best_peer": "safebn's median time over the fastest peer's, same workload and run (under 1: faster)",
        "runs": [{"file": os.path.basename(path), **verdict(list(run.values()))} for path, run in zip(paths, runs)],
        "medians": verdict(list(medians.values())),
        "workloads": [{"pass": key[0], "shape": list(key[1]), "layout": key[2], "dtype": key[3], "param_dtype": key[4],
                       "over_best_peer": [run.get(key) for run in runs], "median": medians[key]} for key in keys],
    }


def suite(memory: str, name: str, runs: int, more: list[str]) -> int:
    """The suite `runs` times for one state of memory, and with several runs their summary."""
    paths = []
    for index in range(1, runs + 1):
        status, path = run_once(memory, name, index, more)
        if status != 0:
            return status
        paths.append(path)
    if runs > 1:
        summary = summarize(memory, paths)
        with open(result_path(memory, name) + "-runs.json", "w") as f:
            f.write(json.dumps(summary, indent=1) + "\n")
        print(f"{memory}: " + "; ".join(
            f"run {index}: fastest in {r['fastest']} of {r['workloads']}, geomean {r['geomean_over_best_peer']}"
            for index, r in enumerate(summary["runs"], 1)) +
            f"; medians: fastest in {summary['medians']['fastest']}, geomean "
            f"{summary['medians']['geomean_over_best_peer']}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--memory", choices=[*MEMORY, "both"], default="both")
    parser.add_argument("--name", default="full-cpu")
    parser.add_argument("--runs", type=int, default=1)
    args, more = parser.parse_known_args()
    if args.runs < 1:
        parser.error("--runs takes 1 or more")
    if args.runs > 1 and {"--json", "--plot"} & set(more):
        parser.error("--runs names each run's files itself: leave out --json and --plot (use --name)")
    sys.exit(max(suite(memory, args.name, args.runs, more)
                 for memory in (MEMORY if args.memory == "both" else [args.memory])))
