"""Data-parallel training with SafeSyncBatchNorm on one CPU machine.

    python examples/ddp_train.py [--epochs 5] [--world-size 2]

Spawns `world-size` processes that talk over gloo. Each takes its share of
every batch of sklearn's bundled 8x8 digits (no download), and
DistributedDataParallel averages the gradients of a small CNN whose batch
norms are SafeSyncBatchNorm: their statistics are those of the whole batch,
so the run computes what one process would on the whole batch. Rank 0 prints
the loss of each epoch, the held-out accuracy and the safety report.
tests/test_distributed.py checks this script against one-process training."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
# Imported before any process group exists: DistributedDataParallel would import it later, and its
# functions' default arguments would then hold the default group past destroy_process_group().
import torch.distributed.nn  # noqa: F401
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torch_safebn

HELD_OUT = 297  # examples kept for the accuracy; 1500 remain to train on


def digits(dtype: torch.dtype = torch.float32):
    """((train images, labels), (held-out images, labels)); images [N, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits  # here: the spawned workers need not import sklearn

    data = load_digits()
    shuffle = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0))
    images = torch.tensor(data.images, dtype=dtype).unsqueeze(1)[shuffle] / 16
    labels = torch.tensor(data.target)[shuffle]
    return (images[:-HELD_OUT], labels[:-HELD_OUT]), (images[-HELD_OUT:], labels[-HELD_OUT:])


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A small CNN with plain nn.BatchNorm2d layers, the same for a given seed."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).to(dtype)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_epoch(model, optimizer, images, labels, epoch, *, batch_size=64, rank=0, world_size=1, max_steps=None):
    """One epoch of SGD over batches of `batch_size` examples, each rank taking
    an equal share of every batch (with equal shares, DDP's average of the
    ranks' gradients is the gradient of the whole batch's mean loss).
    Returns the whole batch's loss at each step, the same on every rank."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
    batches = order[: len(order) // batch_size * batch_size].view(-1, batch_size)[:max_steps]
    losses = []
    for batch in batches:
        mine = batch.chunk(world_size)[rank]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[mine]), labels[mine])
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    return losses


def train_and_evaluate(rank: int, world_size: int, epochs: int, data) -> None:
    """The run itself; its DistributedDataParallel model, which holds the
    process group, is gone when it returns."""
    (images, labels), (held_out, held_out_labels) = data
    model = DistributedDataParallel(torch_safebn.convert_model(make_model(), distributed=True))
    optimizer = make_optimizer(model)
    for epoch in range(epochs):
        losses = train_epoch(model, optimizer, images, labels, epoch, rank=rank, world_size=world_size)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}", flush=True)
    model.eval()  # the running statistics, the same on every rank
    with torch.no_grad():
        accuracy = (model(held_out).argmax(1) == held_out_labels).double().mean().item()
    if rank == 0:
        print(f"held-out accuracy: {accuracy:.3f}\n\n{torch_safebn.report(model.module)}")


def worker(rank: int, world_size: int, init_method: str, epochs: int, data) -> None:
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        train_and_evaluate(rank, world_size, epochs, data)
    finally:
        # Nothing holds the group now, so this tears it down while the
        # interpreter is whole (README: "Ending a data-parallel run").
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = (Path(tmp) / "rendezvous").as_uri()  # a file store: no port to pick
        mp.spawn(worker, args=(args.world_size, init_method, args.epochs, digits()), nprocs=args.world_size)


if __name__ == "__main__":
    main()
