"""Issue 5's CPU suite: the `full` preset (float32 and bfloat16 input, contiguous
and channels_last, fwd / bwd / fwdbwd / eval) against native eager batch norm and
torch.compile, on 2 threads set explicitly. About 17 to 20 minutes on 2 cores.

    python benchmarks/cpu_suite.py [more bench options, e.g. --min-run-time 1]

writes benchmarks/results/full-cpu.json and full-cpu.png, and prints the table.
"""
import os
import sys

from torch_safebn.tools.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

OPTIONS = [
    "bench", "--device", "cpu", "--preset", "full",
    "--dtypes", "float32,bfloat16", "--layouts", "contiguous,channels_last",
    "--passes", "fwd,bwd,fwdbwd,eval", "--peers", "native,compile",
    "--threads", "2", "--min-run-time", "0.5",
    "--json", os.path.join(RESULTS, "full-cpu.json"), "--plot", os.path.join(RESULTS, "full-cpu.png"),
]

if __name__ == "__main__":
    sys.exit(main(OPTIONS + sys.argv[1:]))  # later options override these
