"""Issue 5's CPU suite: the `full` preset (float32 and bfloat16 input, contiguous
and channels_last, fwd / bwd / fwdbwd / eval) against native eager batch norm and
torch.compile, on 2 threads set explicitly. About 17 to 20 minutes on 2 cores for
each state of memory.

    python benchmarks/cpu_suite.py [--memory cold|warm|both] [--name NAME] [more bench options, e.g. --min-run-time 1]

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
"""
import argparse
import json
import os
import subprocess
import sys

from torch_safebn.tools.layer_bench import write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# glibc reads these once, at start-up: a warm run is a process of its own.
WARM_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
MEMORY = {
    "cold": "glibc's defaults: freed large blocks go back to the system",
    "warm": "glibc keeps freed memory (" + ", ".join(f"{k}={v}" for k, v in WARM_MEMORY.items()) + ")",
}


def options(memory: str, name: str) -> list[str]:
    path = os.path.join(RESULTS, name + ("" if memory == "cold" else f"-{memory}"))
    return ["bench", "--device", "cpu", "--preset", "full",
            "--dtypes", "float32,bfloat16", "--layouts", "contiguous,channels_last",
            "--passes", "fwd,bwd,fwdbwd,eval", "--peers", "native,compile",
            "--threads", "2", "--min-run-time", "0.5",
            "--json", f"{path}.json", "--plot", f"{path}.png"]


def run(memory: str, name: str, more: list[str]) -> int:
    """One suite in a process of its own, its JSON stating the state of memory."""
    env = dict(os.environ, **(WARM_MEMORY if memory == "warm" else {}))
    argv = options(memory, name) + more  # later options override these
    status = subprocess.call([sys.executable, "-m", "torch_safebn", *argv], env=env)
    path = argv[max(i for i, arg in enumerate(argv) if arg == "--json") + 1]  # the last one given
    if status == 0:
        with open(path) as f:
            result = json.load(f)
        result["memory"] = {"state": memory, "meaning": MEMORY[memory]}
        write_json(result, path)
    return status


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--memory", choices=[*MEMORY, "both"], default="both")
    parser.add_argument("--name", default="full-cpu")
    args, more = parser.parse_known_args()
    sys.exit(max(run(memory, args.name, more) for memory in (MEMORY if args.memory == "both" else [args.memory])))
