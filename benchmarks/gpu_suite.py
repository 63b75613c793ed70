"""The GPU suite: the cases DESIGN.md's performance reference points were
measured on (H200), in both layouts and dtypes, against native eager batch norm,
native with cuDNN off, and torch.compile. A few minutes on an H100 or H200.

    python benchmarks/gpu_suite.py [more bench options, e.g. --min-run-time 1]

writes benchmarks/results/reference-cuda.json and reference-cuda.png, and prints the table.
"""
import os
import sys

from torch_safebn.tools.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

OPTIONS = [
    "bench", "--device", "cuda", "--shapes", "256x256x56x56,128x64x112x112,20x6x256x256",
    "--dtypes", "float32,bfloat16", "--layouts", "contiguous,channels_last",
    "--passes", "fwd,bwd,fwdbwd,eval", "--peers", "native,native-nocudnn,compile",
    "--min-run-time", "0.5",
    "--json", os.path.join(RESULTS, "reference-cuda.json"), "--plot", os.path.join(RESULTS, "reference-cuda.png"),
]

if __name__ == "__main__":
    sys.exit(main(OPTIONS + sys.argv[1:]))  # later options override these
