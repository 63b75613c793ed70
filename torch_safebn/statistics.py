"""Running statistics that native batch norm gets wrong, pooled exactly:
accumulate_stats(model) updates them once per optimizer step from the
pooled statistics of its micro-batches (gradient accumulation), and
recalibrate(model, batches) sets them from data (after training, SWA or EMA).

Both rest on a StatisticsPool per batch norm: the count, mean and sum of
squared deviations per channel of every batch it saw, merged with Chan's
formula in the accumulation dtype on the module's device (no host
synchronization per batch), and handed to the guarded update once."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._ops import OPS
from .contract import values_per_channel
from .report import name_modules
from .state import SafetyState

__all__ = ["StatisticsPool", "accumulate_stats", "recalibrate", "Recalibration"]


class StatisticsPool:
    """Pooled statistics of batches: per channel their count, mean and sum of
    squared deviations (m2), and the number of examples."""

    def __init__(self) -> None:
        self.count = 0
        self.examples = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, mean: torch.Tensor, var: torch.Tensor, count: int, examples: int) -> None:
        """Merges a batch of `count` values per channel with these statistics
        (the biased variance `var`); an empty batch adds nothing."""
        if count == 0:
            return
        m2 = var * count
        if self.count == 0:
            self.mean, self.m2 = mean.detach().clone(), m2.detach()
        else:
            total = self.count + count
            delta = mean.detach() - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2.detach() + delta * delta * (self.count * count / total)
        self.count += count
        self.examples += examples

    def add_invstd(self, mean: torch.Tensor, invstd: torch.Tensor, eps: float, count: int, examples: int) -> None:
        """add() for statistics given as invstd = 1 / sqrt(var + eps), as the ops return them."""
        self.add(mean, (1.0 / (invstd.detach() * invstd.detach()) - eps).clamp_min(0), count, examples)

    def add_batch(self, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float,
                  virtual_batch_size: int | None) -> None:
        """Adds a training batch from forward_train's statistics: a ghost batch
        norm's ([chunks, C]) chunk by chunk."""
        if not virtual_batch_size:
            self.add_invstd(mean, invstd, eps, values_per_channel(input), input.shape[0])
            return
        for rows, chunk_mean, chunk_invstd in zip(input.split(virtual_batch_size), mean, invstd):
            self.add_invstd(chunk_mean, chunk_invstd, eps, values_per_channel(rows), rows.shape[0])

    def merge(self, other: StatisticsPool) -> None:
        if other.count:
            self.add(other.mean, other.m2 / other.count, other.count, other.examples)

    def invstd(self, eps: float) -> torch.Tensor:
        return torch.rsqrt(self.m2 / self.count + eps)

    def unbiased_var(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)


def _guarded(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "safety_state", None), SafetyState)]


def apply_pool(module: nn.Module, pool: StatisticsPool, momentum: float | None) -> None:
    """The guarded update of `module`'s running statistics, num_batches_tracked
    and counters with the pooled statistics, as one batch; then the module's
    policy acts on what the guard found (raises NonFiniteError for a pool
    holding a non-finite batch, say)."""
    if pool.count == 0:
        return
    track = module.track_running_stats
    running = (module.running_mean, module.running_var, module.num_batches_tracked) if track else (None,) * 3
    weight, bias = (None if t is None else t.detach() for t in (module.weight, module.bias))
    counters = module.safety_counters
    OPS.update_running_stats(*running, counters, pool.mean, pool.invstd(module.eps), weight, bias, pool.count,
                             module.eps, momentum, single_sample=pool.examples == 1 and pool.count > 1)
    if counters is not None:
        module.safety_state.after_op(counters, None, training=True)


@contextlib.contextmanager
def accumulate_stats(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation with the running statistics of the whole batch.

    Training forwards inside the context normalize with their micro-batch's
    statistics as usual, but every torch_safebn batch norm of `model` updates
    its running statistics, num_batches_tracked and counters once, when the
    context exits, with the pooled statistics of all its micro-batches (the
    mean and unbiased variance of their concatenation; uneven micro-batches,
    momentum=None and SafeSyncBatchNorm's group statistics included). The
    guard applies to the pooled update: a micro-batch with NaN/Inf
    statistics is reported (and the update skipped) at the exit. If the body
    raises, nothing is updated.

        with torch_safebn.accumulate_stats(model):
            for micro_batch in chunks:
                loss_fn(model(micro_batch)).backward()
        optimizer.step()"""
    modules = _guarded(name_modules(model))
    if any(m.safety_state.pool is not None for m in modules):
        raise RuntimeError("accumulate_stats is already active for this model (or a module of it): the contexts "
                           "do not nest")
    pools = {id(m): StatisticsPool() for m in modules}
    for m in modules:
        m.safety_state.pool = pools[id(m)]
    try:
        yield
    except BaseException:
        for m in modules:
            m.safety_state.pool = None
        raise
    for m in modules:
        m.safety_state.pool = None
    for m in modules:
        apply_pool(m, pools[id(m)], m.momentum)


@dataclasses.dataclass
class Recalibration:
    """What recalibrate() changed, one row per batch norm: its name, and per
    channel the old and new running mean and variance; `shift` is the
    largest change of a channel's mean in units of its new standard
    deviation. str() is a table."""

    rows: list[dict]

    def __str__(self) -> str:
        if not self.rows:
            return "no batch norms"
        lines = [f"{'module':<32} {'channels':>8} {'max mean shift (std)':>21} {'var ratio (new/old)':>22}"]
        for row in self.rows:
            ratio = row["new_var"] / row["old_var"].clamp_min(torch.finfo(row["old_var"].dtype).tiny)
            lines.append(f"{row['module']:<32} {row['new_mean'].numel():>8} {row['shift']:>21.3g} "
                         f"{float(ratio.min()):>10.3g}..{float(ratio.max()):<10.3g}")
        return "\n".join(lines)


def _default_forward(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0])
    else:
        raise TypeError(f"recalibrate does not know how to feed a batch of type {type(batch).__name__} to the model: "
                        "pass forward=lambda model, batch: ...")


def _native_batch_norms(model: nn.Module) -> list[nn.Module]:
    """torch's batch norms left unguarded (with running statistics), recalibrated through hooks."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(getattr(m, "safety_state", None), SafetyState) and m.track_running_stats]


def _pool_inputs(pool: StatisticsPool):
    def hook(module, args):
        x = args[0].detach()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        var, mean = torch.var_mean(x.to(acc), dim=[0, *range(2, x.dim())], correction=0)
        pool.add(mean, var, values_per_channel(x), x.shape[0])

    return hook


def _all_reduce(pool: StatisticsPool, device: torch.device, channels: int) -> None:
    """Merges the pools of every rank of the default process group into `pool` (Chan's formula)."""
    world = dist.get_world_size()
    row = torch.zeros(2 * channels + 2, dtype=torch.float64, device=device)
    if pool.count:
        row[2:] = torch.cat([pool.mean.double(), pool.m2.double()])
    row[0], row[1] = pool.count, pool.examples
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    merged = StatisticsPool()
    for other in rows:
        count = int(other[0])
        if count:
            merged.add(other[2:2 + channels], other[2 + channels:] / count, count, int(other[1]))
    if merged.count:
        dtype = pool.mean.dtype if pool.mean is not None else torch.float32
        pool.count, pool.examples = merged.count, merged.examples
        pool.mean, pool.m2 = merged.mean.to(dtype), merged.m2.to(dtype)


def recalibrate(model: nn.Module, batches: Iterable, *, forward: Callable | None = None,
                num_batches: int | None = None, progress: bool | None = None) -> Recalibration:
    """Re-estimates every batch norm's running statistics from data, in one
    pass over `batches` (at most `num_batches` of them): the batch norms
    normalize with their batch statistics as in training while every other
    module is in eval mode (dropout off), and each one's running statistics
    become the exact pooled mean and unbiased variance of its input over all
    batches (not a momentum average), through the guarded update (a NaN/Inf
    batch raises NonFiniteError and changes nothing). `forward(model,
    batch)` feeds a batch (default: a tensor as model(batch), a mapping as
    model(**batch), a tuple or list as model(batch[0])). With
    torch.distributed initialized the statistics are pooled over the default
    process group (SafeSyncBatchNorm's are the group's already). The
    modules' modes and the parameters are left as they were; a progress bar
    (tqdm, when installed) shows on a terminal unless progress=False.
    Returns the change per layer (Recalibration)."""
    forward = forward or _default_forward
    guarded, native = _guarded(name_modules(model)), _native_batch_norms(model)
    batch_norms = [m for m in guarded if m.track_running_stats and m.running_mean is not None] + native
    modes = {m: m.training for m in model.modules()}
    pools = {m: StatisticsPool() for m in batch_norms}
    old = {m: (m.running_mean.clone(), m.running_var.clone()) for m in batch_norms}
    hooks = [m.register_forward_pre_hook(_pool_inputs(pools[m])) for m in native]
    model.eval()
    for m in batch_norms:
        m.train()
        if m not in native:
            m.safety_state.pool = pools[m]
    try:
        with torch.no_grad():
            for step, batch in enumerate(_progress(batches, num_batches, progress)):
                if num_batches is not None and step >= num_batches:
                    break
                forward(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        for m in guarded:
            m.safety_state.pool = None
        for m, training in modes.items():
            m.train(training)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rows = []
    for name, m in model.named_modules():
        if m not in pools:
            continue
        pool = pools[m]
        if distributed and not _is_sync(m):  # SafeSyncBatchNorm pooled its group's statistics already
            _all_reduce(pool, m.running_mean.device, m.running_mean.numel())
        if m in native:
            _set_native(m, pool)
        else:
            apply_pool(m, pool, momentum=1.0)
        old_mean, old_var = old[m]
        new_std = (m.running_var.double() + m.eps).sqrt()
        rows.append({"module": name or "(root)", "old_mean": old_mean, "new_mean": m.running_mean.clone(),
                     "old_var": old_var, "new_var": m.running_var.clone(),
                     "shift": float(((m.running_mean.double() - old_mean.double()).abs() / new_std).max())
                     if m.running_mean.numel() else 0.0})
    return Recalibration(rows)


def _is_sync(module: nn.Module) -> bool:
    from .distributed import SafeSyncBatchNorm

    return isinstance(module, SafeSyncBatchNorm)


def _set_native(module: nn.Module, pool: StatisticsPool) -> None:
    """A torch batch norm's running statistics set to the pool's, which must be finite."""
    if pool.count < 2:
        return
    mean, var = pool.mean, pool.unbiased_var()
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        from .errors import NonFiniteError

        raise NonFiniteError(f"recalibrate: the inputs of {type(module).__name__} hold NaN/Inf; its running "
                             "statistics were left as they were. Check the data.")
    with torch.no_grad():
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        module.num_batches_tracked.add_(1)


def _progress(batches: Iterable, total: int | None, progress: bool | None) -> Iterable:
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return batches
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    return tqdm(batches, total=total, desc="recalibrate", unit="batch", leave=False)
