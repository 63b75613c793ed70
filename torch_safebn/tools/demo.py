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

__all__ = ["Run", "train", "main"]


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
        return f"{name} at step {run.error_step}" if run.error_step < steps else f"{name} via check() after step {steps - 1}"
    if run.diverged:
        text = f"inf/nan from step {run.first_nonfinite_step}"
        return text + (", no message" if run.skipped_updates is None else f", {run.skipped_updates} skips counted")
    return f"converged, loss {run.losses[-1]:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torch-safebn demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    print(__doc__)
    print(f"lr={args.lr}, {args.steps} steps, seeds 0..{args.seeds - 1}\n")
    columns = ("seed", "nn.BatchNorm2d", "SafeBatchNorm2d", "SafeBatchNorm2d, on_nonfinite='skip'")
    header = f"{columns[0]:>4}  {columns[1]:<32}  {columns[2]:<38}  {columns[3]:<36}  running_var native / safe"
    print(header)
    print("-" * len(header))
    first_error = first_warning = None
    for seed in range(args.seeds):
        native = train(seed, safe=False, lr=args.lr, steps=args.steps)
        safe = train(seed, safe=True, lr=args.lr, steps=args.steps)
        skip = train(seed, safe=True, lr=args.lr, steps=args.steps, on_nonfinite="skip")
        print(f"{seed:>4}  {_summary(native, args.steps):<32}  {_summary(safe, args.steps):<38}  "
              f"{_summary(skip, args.steps):<36}  {native.running_var:.4g} / {safe.running_var:.4g}")
        if safe.error_step is not None and safe.error_step < args.steps:
            first_error = first_error or safe.error
        first_warning = first_warning or next(iter(safe.warnings), None)
    print("\nNative said nothing. SafeBatchNorm2d warned at step 0:\n  " + str(first_warning))
    if first_error:
        print("\nand stopped the diverging runs with:\n  " + first_error)
    print("\nIts running statistics stayed finite in every run. Try --lr 0.05: every seed converges.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
