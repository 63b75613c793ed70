"""The report torch_safebn began from, as a runnable side-by-side.

A newcomer trains BatchNorm2d -> Conv2d(1, 1, [1, 16]) on one [1, 1, 1, 16]
example with SGD (lr=0.1) towards a target of 1. In most seeds the loss
climbs to inf, then nan, and native PyTorch says nothing. The cause is the
learning rate, not the batch: batch norm rescales the 16 values to unit
variance, so the loss's curvature along the conv weights is
2 * 16 * weight_bn**2 = 32 at initialization, above the 2 / lr = 20 that
gradient descent tolerates; the iterates overshoot and grow. With lr=0.05
(below 2/32) every seed converges."""
from __future__ import annotations

import argparse
import dataclasses
import math
import warnings

import torch
from torch import nn

import torch_safebn

from .text import render_table, wrap

__all__ = ["DESCRIPTION", "Run", "add_options", "main", "run", "train"]


@dataclasses.dataclass
class Run:
    seed: int
    losses: list[float]
    warnings: list[str]
    error: str | None  # the exception's text, if training stopped on one
    error_step: int | None  # the step that raised; == steps when check() found it after the last step
    parameters_nonfinite_step: int | None  # first step whose forward saw a non-finite BN weight or bias
    running_mean: float
    running_var: float
    skipped_updates: int | None  # None for native

    @property
    def diverged(self) -> bool:
        return any(not math.isfinite(v) for v in self.losses)

    @property
    def first_nonfinite_step(self) -> int | None:
        return next((i for i, v in enumerate(self.losses) if not math.isfinite(v)), None)


def train(seed: int, safe: bool, lr: float = 0.1, steps: int = 10, **options) -> Run:
    """The newcomer's program; `safe` swaps in SafeBatchNorm2d with `options`."""
    torch.manual_seed(seed)
    example = torch.randn(1, 1, 1, 16)
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 1, [1, 16]))
    if safe:
        torch_safebn.convert_model(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, error, error_step, parameters_nonfinite_step = [], None, None, None
    bn = model[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(steps + 1):
                if parameters_nonfinite_step is None and not all(torch.isfinite(p).all() for p in bn.parameters()):
                    parameters_nonfinite_step = step
                if step == steps:
                    break
                loss = (model(example) - 1).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if safe:  # the optimizer's last step is seen by no forward: check() looks
                torch_safebn.check(model)
        except torch_safebn.SafetyError as exc:
            error, error_step = f"{type(exc).__name__}: {exc}", len(losses)
    return Run(
        seed, losses, [str(w.message) for w in caught], error, error_step, parameters_nonfinite_step,
        bn.running_mean.item(), bn.running_var.item(),
        torch_safebn.report(model).rows[0]["skipped_updates"] if safe else None,
    )


def _summary(run: Run, steps: int) -> str:
    if run.error is not None:
        name = run.error.split(":")[0]
        return f"{name} at step {run.error_step}" if run.error_step < steps else f"{name} via check()"
    if run.diverged:
        text = f"inf/nan from step {run.first_nonfinite_step}"
        return text + (", no message" if run.skipped_updates is None else f", {run.skipped_updates} skipped")
    return f"converged, loss {run.losses[-1]:.2g}"


DESCRIPTION = __doc__.split("\n\n")[0].replace("\n", " ")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=10, help="runs with seeds 0 to SEEDS - 1 (default: 10)")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="SGD's learning rate (default: 0.1; every seed converges below 2/32 = 0.0625)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run (default: 10)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Trains every seed natively, with SafeBatchNorm2d, and with on_nonfinite='skip'; prints them side by side."""
    print(__doc__)
    print(f"lr={args.lr}, {args.steps} steps, seeds 0..{args.seeds - 1}\n")
    header = ["seed", "nn.BatchNorm2d", "SafeBatchNorm2d", "on_nonfinite='skip'"]
    lines, safe_runs = [], []
    for seed in range(args.seeds):
        native = train(seed, safe=False, lr=args.lr, steps=args.steps)
        safe = train(seed, safe=True, lr=args.lr, steps=args.steps)
        skip = train(seed, safe=True, lr=args.lr, steps=args.steps, on_nonfinite="skip")
        lines.append([str(seed), *(_summary(r, args.steps) for r in (native, safe, skip))])
        safe_runs += [safe, skip]
    print("\n".join(render_table(header, lines, text_columns=(1, 2, 3))))
    if any("via check()" in cell for line in lines for cell in line):
        print("\nvia check(): torch_safebn.check(model) raised it after the last step, whose update no forward saw.")
    first_warning = next((w for r in safe_runs for w in r.warnings), None)
    first_error = next((r.error for r in safe_runs if r.error_step is not None and r.error_step < args.steps), None)
    print("\nNative said nothing. SafeBatchNorm2d warned at step 0:\n" + wrap(str(first_warning), indent="  "))
    if first_error:
        print("\nand stopped the diverging runs with:\n" + wrap(first_error, indent="  "))
    finite = sum(math.isfinite(r.running_mean) and math.isfinite(r.running_var) for r in safe_runs)
    print("\n" + wrap(f"SafeBatchNorm2d's running statistics stayed finite in {finite} of {len(safe_runs)} runs. "
                      "Try --lr 0.05: every seed converges."))
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m torch_safebn.tools.demo [options]: the same as torch-safebn demo."""
    parser = argparse.ArgumentParser(prog="torch-safebn demo", description=DESCRIPTION)
    add_options(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
