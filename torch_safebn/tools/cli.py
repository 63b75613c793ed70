"""`torch-safebn` (also `python -m torch_safebn`): the command's parser, and
the subcommand it runs.

  info   what is installed: versions, backend, kernels, CPU, threads, GPU   (info.py)
  check  self-test on every available device; non-zero exit on any failure  (selfcheck.py)
  bench  time torch_safebn: layers, the host cost per call, whole models     (bench_command.py)
  demo   the motivating example, with and without torch_safebn             (demo.py)
"""
from __future__ import annotations

import argparse
import shutil
import sys

import torch

import torch_safebn

from . import bench_command, demo, info
from .quiet_imports import import_cpp_extension_quietly
from .text import WIDTH

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand and returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help at most WIDTH columns wide (it fills the terminal), with
    descriptions filled paragraph by paragraph, and a paragraph of indented
    lines (a table) kept as written."""

    def __init__(self, prog: str):
        super().__init__(prog, width=min(WIDTH, shutil.get_terminal_size().columns))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(paragraph if paragraph.startswith(" ") else fill(paragraph, width, indent)
                           for paragraph in text.split("\n\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-safebn", formatter_class=_HelpFormatter,
        description="torch_safebn: batch norm that cannot be silently poisoned. "
                    "Inspect the install, self-test it, benchmark it, replay the report that started it.")
    parser.add_argument("--version", action="version",
                        version=f"torch-safebn {torch_safebn.__version__} (torch {torch.__version__}, "
                                f"backend {torch_safebn.backend()})")
    commands = parser.add_subparsers(dest="command", metavar="{info,check,bench,demo}", title="commands",
                                     help="torch-safebn COMMAND --help describes each one's options")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)

    command("info", "versions, backend, kernels, CPU, threads, GPU",
            "What is installed and where it runs: torch_safebn's and torch's versions, the live backend "
            "(compiled kernels or the reference fallback), CUDA kernels, the CPU, threads and GPU."
            ).set_defaults(run=info.run)
    command("check", "parity with nn.BatchNorm, gradcheck and opcheck on every available device",
            "Self-test of this build on every available device: parity with nn.BatchNorm (outputs, running "
            "statistics, gradients; training and eval; contiguous and channels_last), gradcheck and "
            "gradgradcheck in float64, and torch.library.opcheck of every safebn op. Prints PASS or FAIL per "
            "check and exits 1 if any failed.").set_defaults(run=_check)
    bench_command.add_options(command(
        "bench", "time torch_safebn against native batch norm: layers, host cost per call, whole models",
        bench_command.DESCRIPTION))
    demo.add_options(command("demo", "the motivating example, with and without torch_safebn", demo.DESCRIPTION))
    return parser


def _check(args: argparse.Namespace) -> int:
    import_cpp_extension_quietly()  # opcheck's test utilities import it: its CUDA_HOME notice is not ours
    from . import selfcheck

    return selfcheck.main()
