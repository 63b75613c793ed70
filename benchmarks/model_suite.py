"""Issue 14's models on the CPU: torchvision's resnet18 and timm's efficientnet_b0, training steps
at batch 8 on 96 x 96 images, native and converted, eager and torch.compile, float32, 2 threads set
explicitly. About 15 minutes on 2 cores, most of it inductor compiling.

    python benchmarks/model_suite.py [more bench options, e.g. --min-run-time 20]

writes benchmarks/results/model-resnet18-cpu.json and .png, model-efficientnet_b0-cpu.json and
.png, and prints their tables.
"""
import os
import sys

from torch_safebn.tools.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

MODELS = {"resnet18": "resnet18", "timm:efficientnet_b0": "efficientnet_b0"}  # --model: file name


def options(model: str) -> list[str]:
    path = os.path.join(RESULTS, f"model-{MODELS[model]}-cpu")
    return ["bench", "--model", model, "--device", "cpu", "--threads", "2", "--batch-size", "8",
            "--image-size", "96", "--variants", "eager,compile", "--dtypes", "float32",
            "--json", f"{path}.json", "--plot", f"{path}.png"]


if __name__ == "__main__":
    sys.exit(max(main(options(model) + sys.argv[1:]) for model in MODELS))  # later options override these
