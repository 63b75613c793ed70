"""SafeSyncBatchNorm against nn.BatchNorm on the concatenated batch, on CPU with gloo.

Each multi-process test spawns its ranks once and runs a group of checks in
them (spawning costs seconds); a check that fails raises in its rank and the
test shows that rank's traceback. Every spawned job is bounded in time, so a
rank left waiting in a collective fails the test instead of hanging it."""
from __future__ import annotations

import collections
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_safebn
from torch_safebn import DegenerateBatchError, NonFiniteError, SafeSyncBatchNorm
from torch_safebn.distributed import GroupSafetyState

ROOT = Path(__file__).resolve().parents[1]
NATIVE_FOR_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
TIGHT = {"atol": 1e-10, "rtol": 1e-10}  # float64: the two differ by summation order only
JOB_TIMEOUT_S = 120  # a job takes 10 to 40 s on 2 cores, with other work or without; a hang never ends


# -- running checks on several processes ------------------------------------------------
def _rank_main(rank: int, world_size: int, init_method: str, checks, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        checks(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # A gloo group that something still references after destroy_process_group()
    # (DistributedDataParallel's reducer, a frame) is torn down during interpreter
    # finalization, where CPython ends a worker thread that asks for the GIL with
    # pthread_exit, and torch 2.14.1's gloo aborts ("terminate called without an
    # active exception", about one run in ten). A rank that passed has nothing
    # left to do: it leaves without finalizing. A rank that raised goes on to
    # report its traceback as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(checks, world_size: int, tmp_path: Path, *args) -> None:
    """Runs checks(rank, world_size, *args) in `world_size` new processes
    joined in a gloo group; fails with a rank's traceback if one raises, or
    after JOB_TIMEOUT_S if a rank does not finish."""
    init_method = (tmp_path / "rendezvous").as_uri()  # a file store: no port to pick
    context = mp.start_processes(
        _rank_main, args=(world_size, init_method, checks, args), nprocs=world_size, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.terminate()
            for process in context.processes:
                process.join()
            pytest.fail(
                f"{checks.__name__} on {world_size} processes did not finish in {JOB_TIMEOUT_S} s: "
                "is a rank waiting in a collective that another rank skipped?"
            )


def _shares(sizes: list[int], rank: int) -> slice:
    """This rank's rows of the concatenated batch, when rank r holds sizes[r] examples."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _module_pair(num_features: int, dim: int, **options):
    """nn.BatchNorm with random affine parameters, and a SafeSyncBatchNorm with its state."""
    native = NATIVE_FOR_DIM[dim](num_features, dtype=torch.float64, momentum=options.pop("momentum", 0.1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        native.weight.copy_(torch.rand(num_features, generator=g, dtype=torch.float64) + 0.5)
        native.bias.copy_(torch.randn(num_features, generator=g, dtype=torch.float64))
    safe = SafeSyncBatchNorm(num_features, momentum=native.momentum, dtype=torch.float64, **options)
    safe.load_state_dict(native.state_dict())
    return native, safe


def _buffers(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- the checks (they run in the spawned ranks) ------------------------------------------
def _check_parity(sizes, tail, memory_format=torch.contiguous_format, momentum=0.1, group=None):
    """Two training steps, the group's rank r holding sizes[r] examples of
    shape [C, *tail]: outputs, input gradients and running statistics equal
    nn.BatchNorm's on the concatenated batch, and so do the parameter
    gradients summed over the ranks (each rank's is its share, as with
    nn.SyncBatchNorm; DDP averages them)."""
    assert len(sizes) == dist.get_world_size(group)
    native, safe = _module_pair(3, 2 + len(tail), momentum=momentum, process_group=group)
    mine = _shares(sizes, dist.get_rank(group))
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        batch = torch.randn(sum(sizes), 3, *tail, generator=g, dtype=torch.float64) * 2 + 0.5
        grad = torch.randn(batch.shape, generator=g, dtype=torch.float64)

        expected_input = batch.clone().requires_grad_()
        expected = native(expected_input)
        expected.backward(grad)
        input = batch[mine].contiguous(memory_format=memory_format).requires_grad_()
        output = safe(input)
        output.backward(grad[mine].contiguous(memory_format=memory_format))

        torch.testing.assert_close(output, expected[mine].detach(), **TIGHT)
        assert output.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(input.grad, expected_input.grad[mine], **TIGHT)
        for name in ("weight", "bias"):
            group_grad = getattr(safe, name).grad.clone()
            dist.all_reduce(group_grad, group=group)
            torch.testing.assert_close(group_grad, getattr(native, name).grad, **TIGHT)
        native.zero_grad()
        safe.zero_grad()
    for name, value in native.state_dict().items():
        torch.testing.assert_close(safe.state_dict()[name], value, **TIGHT, msg=f"{name} differs")


def _named(module: nn.Module) -> nn.Module:
    """`module` as the child 'bn' of a model, named for messages."""
    return torch_safebn.name_modules(nn.Sequential(OrderedDict(bn=module)))


def _check_nonfinite_raises_on_every_rank(rank, bad_rank, group=None):
    model = _named(_module_pair(3, 4, process_group=group)[1])
    before = _buffers(model)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    if rank == bad_rank:
        x[1, 2, 0, 3] = float("nan")
    with pytest.raises(NonFiniteError) as error:
        model(x)
    message = str(error.value)
    assert "'bn'" in message and f"rank {rank} " in message, message
    assert re.search(rf"came from rank {bad_rank} of the process group", message), message
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} changed on rank {rank}"


def _check_nonfinite_skip_counts_on_every_rank(rank, bad_rank):
    model = _named(_module_pair(3, 4, on_nonfinite="skip")[1])
    before = _buffers(model)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    if rank == bad_rank:
        x[0, 0, 1, 1] = float("inf")
    model(x)  # no error
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} changed on rank {rank}"
    row = torch_safebn.report(model).rows[0]
    assert (row["batches"], row["skipped_updates"], row["nonfinite_events"]) == (1, 1, 1), row
    model(torch.randn(2, 3, 4, 4, dtype=torch.float64))  # a finite batch is applied again
    assert model.bn.num_batches_tracked.item() == 1
    assert torch_safebn.report(model).rows[0]["skipped_updates"] == 1


def _check_one_value_per_channel_in_the_group(rank, world_size):
    sizes = [0, 1] + [0] * (world_size - 2)
    x = torch.randn(sizes[rank], 3, dtype=torch.float64)
    raising = _module_pair(3, 2)[1]
    before = _buffers(raising)
    with pytest.raises(DegenerateBatchError, match=r"'bn', rank \d+ \(.*by rank.*\{0: 0, 1: 1"):
        _named(raising)(x)
    # on_degenerate="running_stats": every rank normalizes with them and leaves them be
    native, safe = _module_pair(3, 2, on_degenerate="running_stats")
    with pytest.warns(RuntimeWarning, match="normalized with the running statistics"):
        output = _named(safe)(x)
    torch.testing.assert_close(output, native.eval()(x), **TIGHT)
    assert torch_safebn.report(safe).rows[0]["degenerate_batches"] == 1
    for name, value in before.items():
        assert torch.equal(raising.state_dict()[name], value), f"{name} changed on rank {rank}"
        assert torch.equal(safe.state_dict()[name], value), f"{name} changed on rank {rank}"
    # checkpointed, the recomputation normalizes with the running statistics as the first pass did,
    # and the backward is theirs (eval mode's), with no collective
    for use_reentrant in (False, True):
        plain_x, checkpointed_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            safe(plain_x).pow(2).sum().backward()
            torch.utils.checkpoint.checkpoint(safe, checkpointed_x, use_reentrant=use_reentrant).pow(2).sum().backward()
        torch.testing.assert_close(checkpointed_x.grad, plain_x.grad, **TIGHT)


def _check_a_module_called_twice_before_its_backward(rank):
    """A shared layer: the second call's update of the running statistics leaves the first call's
    backward valid (native's SyncBatchNorm saves no buffer for it either), whatever the policy."""
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randn(2 + rank, 3, 2, 2, dtype=torch.float64, generator=g) for _ in range(2)]
    grads = []
    for options in ({}, {"on_degenerate": "running_stats"}):
        shared = _module_pair(3, 4, **options)[1]
        inputs = [x.clone().requires_grad_() for x in batches]
        (shared(inputs[0]) * shared(inputs[1])).sum().backward()
        grads.append([x.grad for x in inputs])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, **TIGHT)


def _check_single_example_in_the_group_warns(rank, world_size):
    sizes = [0, 1] + [0] * (world_size - 2)
    safe = _module_pair(3, 3)[1]
    with pytest.warns(RuntimeWarning, match="single example"):
        safe(torch.randn(sizes[rank], 3, 5, dtype=torch.float64))
    assert torch_safebn.report(safe).rows[0]["single_sample_batches"] == 1


def _check_empty_group_batch_changes_nothing(rank):
    safe = _module_pair(3, 4)[1]
    before = _buffers(safe)
    x = torch.randn(0, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    output = safe(x)
    output.sum().backward()
    assert output.shape == x.shape and x.grad.shape == x.shape
    for name, value in before.items():
        assert torch.equal(safe.state_dict()[name], value), f"{name} changed on rank {rank}"


def _check_process_group(rank):
    """Modules synchronized over ranks 0 and 2 only; messages give global ranks.
    Rank 1, outside the group, normalizes its own batch, as nn.SyncBatchNorm
    does (on a GPU; on the CPU it refuses to run at all)."""
    group = dist.new_group([0, 2])  # every rank takes part in creating it
    if rank == 1:
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        safe = SafeSyncBatchNorm(3, process_group=group).double()
        native = nn.BatchNorm2d(3).double()
        torch.testing.assert_close(safe(x), native(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(safe.running_var, native.running_var, rtol=0, atol=1e-12)
        return
    _check_parity([2, 1], (4, 5), group=group)
    _check_nonfinite_raises_on_every_rank(rank, bad_rank=2, group=group)


class _CountingOps(TorchDispatchMode):
    """Counts the calls of each safebn op."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _check_checkpointed_recompute_needs_no_collective(rank, world_size):
    """A checkpointed block of SafeSyncBatchNorm: its recomputation reuses the first pass's group
    statistics (no second all_gather), kept in C++ by the eager forward, and updates nothing;
    gradients and buffers as an unchecked twin's."""
    for use_reentrant in (False, True):
        plain = torch_safebn.convert_model(_conv_net(), distributed=True)
        checked = torch_safebn.convert_model(_conv_net(), distributed=True)
        for step in range(2):
            x = torch.randn(2 + rank, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            plain_x, checked_x = x.clone().requires_grad_(), x.clone().requires_grad_()
            plain(plain_x).pow(2).sum().backward()
            with _CountingOps() as counting:
                checkpointed = torch.utils.checkpoint.checkpoint(checked, checked_x, use_reentrant=use_reentrant)
                checkpointed.pow(2).sum().backward()
            # two layers, each gathering once (the first pass) and normalizing again without a collective
            assert counting.calls["safebn.sync_batch_norm_train"] == 2, counting.calls
            assert counting.calls["safebn.sync_normalize"] == 2, counting.calls
            torch.testing.assert_close(checked_x.grad, plain_x.grad, **TIGHT)
        for (name, value), checked_value in zip(plain.named_parameters(), checked.parameters()):
            torch.testing.assert_close(checked_value.grad, value.grad, **TIGHT, msg=name)
        for name, value in plain.state_dict().items():
            assert torch.equal(checked.state_dict()[name], value), name


def _check_accumulated_micro_batches_over_the_group(rank, world_size):
    """accumulate_stats with SafeSyncBatchNorm: one update, from the group's pooled micro-batches,
    equal to one process's nn.BatchNorm on the whole batch."""
    native, safe = _module_pair(3, 4)
    sizes = [[3, 1, 4], [2, 5, 0], [1, 1, 1]][:world_size]
    batch = torch.randn(sum(map(sum, sizes)), 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    native(batch)
    start = 0
    chunks = []
    for micro in range(3):  # micro-batch m holds sizes[r][m] examples of rank r, in rank order
        per_rank = [sizes[r][micro] for r in range(world_size)]
        chunks.append(batch[start + sum(per_rank[:rank]): start + sum(per_rank[:rank + 1])])
        start += sum(per_rank)
    with torch_safebn.accumulate_stats(safe):
        for chunk in chunks:
            safe(chunk)
    for name, value in native.state_dict().items():
        torch.testing.assert_close(safe.state_dict()[name], value, **TIGHT, msg=f"{name} differs")


def three_ranks(rank, world_size):
    _check_parity([3, 1, 0], (4, 5))
    _check_parity([1, 0, 4], (4, 5), torch.channels_last)
    _check_parity([3, 1, 0], ())  # rank 1: one value per channel
    _check_parity([2, 0, 3], (6,), momentum=None)
    _check_parity([0, 2, 1], (2, 3, 4), torch.channels_last_3d)
    _check_nonfinite_raises_on_every_rank(rank, bad_rank=1)
    _check_nonfinite_skip_counts_on_every_rank(rank, bad_rank=2)
    _check_one_value_per_channel_in_the_group(rank, world_size)
    _check_single_example_in_the_group_warns(rank, world_size)
    _check_a_module_called_twice_before_its_backward(rank)
    _check_empty_group_batch_changes_nothing(rank)
    _check_checkpointed_recompute_needs_no_collective(rank, world_size)
    _check_accumulated_micro_batches_over_the_group(rank, world_size)
    _check_process_group(rank)


def _example():
    spec = importlib.util.spec_from_file_location("ddp_train", ROOT / "examples" / "ddp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_ddp_training_matches_one_process(rank, world_size, data):
    """The example's DDP training, in float64, against the same steps in one
    process on the whole batches with plain nn.BatchNorm2d."""
    example = _example()
    images, labels = data
    model = torch.nn.parallel.DistributedDataParallel(
        torch_safebn.convert_model(example.make_model(torch.float64), distributed=True)
    )
    steps = dict(batch_size=32, max_steps=4)
    losses = example.train_epoch(model, example.make_optimizer(model), images, labels, 0,
                                 rank=rank, world_size=world_size, **steps)
    reference = example.make_model(torch.float64)
    expected = example.train_epoch(reference, example.make_optimizer(reference), images, labels, 0, **steps)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), **TIGHT)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[name], value, **TIGHT, msg=f"{name} differs")


def _conv_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                         nn.BatchNorm2d(5)).to(dtype)


def _check_compiled_training_matches_one_process(rank, world_size):
    """torch.compile(fullgraph=True) of a converted model: three SGD steps, gradients summed over
    the ranks, unequal and changing per-rank batches, against one process training nn.BatchNorm2d
    on the whole batch; then NaN on one rank raises on every rank, buffers untouched. (An empty
    per-rank batch: below, without convolutions, whose compiled backward fails on an empty batch
    in torch 2.14.1 itself.)"""
    torch._dynamo.reset()
    reference, model = _conv_net(), torch_safebn.convert_model(_conv_net(), distributed=True)
    compiled = torch.compile(model, fullgraph=True)
    optimizer, reference_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    for step, sizes in enumerate([[3, 5], [4, 1], [1, 6]]):
        g = torch.Generator().manual_seed(step)
        batch = torch.randn(sum(sizes), 3, 6, 6, generator=g, dtype=torch.float64)
        (compiled(batch[_shares(sizes, rank)]).square().sum() / 1000).backward()
        for parameter in model.parameters():
            dist.all_reduce(parameter.grad)
        (reference(batch).square().sum() / 1000).backward()
        for m, o in ((model, optimizer), (reference, reference_optimizer)):
            o.step()
            o.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, **TIGHT, msg=f"{name} differs")
    torch_safebn.name_modules(model)
    before = _buffers(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    if rank == 1:
        x[1, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'1', rank \d .* came from rank 1 of the process group"):
        compiled(x)
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} changed on rank {rank}"
    # an empty batch on one rank, compiled
    torch._dynamo.reset()
    native, safe = _module_pair(3, 4)
    compiled = torch.compile(safe, fullgraph=True)
    for sizes in ([4, 0], [0, 3]):
        batch = torch.randn(sum(sizes), 3, 5, 5, dtype=torch.float64)
        x = batch[_shares(sizes, rank)].requires_grad_()
        expected_input = batch.clone().requires_grad_()
        compiled(x).sum().backward()
        native(expected_input).sum().backward()
        torch.testing.assert_close(x.grad, expected_input.grad[_shares(sizes, rank)], **TIGHT)
    for name, value in native.state_dict().items():
        torch.testing.assert_close(safe.state_dict()[name], value, **TIGHT, msg=f"{name} differs")


# -- faults: every rank ends in a clear error, within the group's timeout, never a hang ----------
FAULT_TIMEOUT = datetime.timedelta(seconds=20)


def _two_layers(channels: int, group) -> nn.Module:
    return torch_safebn.name_modules(nn.Sequential(OrderedDict(
        a=SafeSyncBatchNorm(channels, process_group=group, dtype=torch.float64),
        b=SafeSyncBatchNorm(channels, process_group=group, dtype=torch.float64))))


def _check_ranks_that_disagree(rank, world_size):
    """Another channel count, or one rank's layer in eval mode (at the first step or a later one):
    every rank gets an error that says how the ranks differ, instead of collectives that pair
    different forwards (wrong statistics) or rows of different sizes (gloo aborts the process)."""
    for disagreement in ("channels", "eval at the first step", "eval at a later step"):
        group = dist.new_group(timeout=FAULT_TIMEOUT)  # each in a group of its own
        channels = 4 if disagreement == "channels" and rank == 1 else 3
        model = _two_layers(channels, group)
        x = torch.randn(4, channels, 3, 3, dtype=torch.float64)
        if disagreement == "eval at a later step":
            model(x).sum().backward()
        if disagreement.startswith("eval") and rank == 1:
            model.a.eval()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"the ranks (disagree at the first synchronized forward|are out of "
                                               r"step).*same synchronized forwards") as raised:
            model(x).sum().backward()
        assert f"rank {rank}" in str(raised.value) and time.monotonic() - start < 60, disagreement


def _check_more_channels_than_at_registration(rank, world_size):
    """A module without parameters or buffers takes any channel count, but its rows were sized at its
    first synchronized forward: more channels later raise on every rank, before any collective, and
    the module goes on with the channels it registered with."""
    group = dist.new_group(timeout=FAULT_TIMEOUT)
    bn = SafeSyncBatchNorm(3, affine=False, track_running_stats=False, process_group=group, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    bn(x)
    with pytest.raises(ValueError, match=r"rows hold at most 3 channels, and this call's input has 5"):
        bn(torch.randn(4, 5, 2, 2, dtype=torch.float64))
    whole = torch.cat([torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
                       for r in range(world_size)])
    expected = nn.functional.batch_norm(whole, None, None, training=True)
    torch.testing.assert_close(bn(whole[4 * rank:4 * rank + 4]), expected[4 * rank:4 * rank + 4], **TIGHT)


def _check_a_rank_that_leaves_mid_step(rank, world_size, how):
    """Rank 1 stops in the middle of a step (its step raised and it left the group, or its process
    exited): rank 0, waiting in the all_gather, gets an error that says so, within the timeout."""
    model = _two_layers(3, None)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    model(x).sum().backward()
    if rank == 1:
        if how == "exits":
            os._exit(0)
        return  # as after an exception: the harness leaves the group
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)'a', rank 0 .*the all_gather of the process group's batch "
                                           r"statistics failed.*Another rank may have failed, exited or timed out"):
        model(x).sum().backward()
    assert time.monotonic() - start < 60


def _check_an_empty_batch_on_every_rank(rank, world_size):
    model = _two_layers(3, None)
    before = _buffers(model)
    x = torch.randn(0, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} changed on rank {rank}"


def two_ranks(rank, world_size, data):
    _check_an_empty_batch_on_every_rank(rank, world_size)
    _check_more_channels_than_at_registration(rank, world_size)
    _check_ddp_training_matches_one_process(rank, world_size, data)
    _check_compiled_training_matches_one_process(rank, world_size)
    _check_nonfinite_raises_on_every_rank(rank, bad_rank=0)
    _check_one_value_per_channel_in_the_group(rank, world_size)


# -- the tests ----------------------------------------------------------------------------
def test_three_ranks_match_native_and_guard_together(tmp_path):
    run_on_ranks(three_ranks, 3, tmp_path)


def test_ranks_that_disagree_get_an_error_on_every_rank(tmp_path):
    run_on_ranks(_check_ranks_that_disagree, 2, tmp_path)


@pytest.mark.parametrize("how", ["raises", "exits"])
def test_a_rank_that_leaves_mid_step_ends_in_an_error_not_a_hang(tmp_path, how):
    run_on_ranks(_check_a_rank_that_leaves_mid_step, 2, tmp_path, how)


def test_two_ranks_ddp_training_matches_one_process(tmp_path):
    (images, labels), _ = _example().digits(torch.float64)
    run_on_ranks(two_ranks, 2, tmp_path, (images[:128], labels[:128]))


# -- one process: the fallbacks, the checkpoint format, the conversion ------------------
def _assert_same_training(native: nn.Module, safe: nn.Module, x: torch.Tensor) -> None:
    expected_input, input = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, output = native(expected_input), safe(input)
    grad = torch.randn_like(x)
    expected.backward(grad)
    output.backward(grad)
    torch.testing.assert_close(output, expected, **TIGHT)
    torch.testing.assert_close(input.grad, expected_input.grad, **TIGHT)
    torch.testing.assert_close(safe.weight.grad, native.weight.grad, **TIGHT)
    for name, value in native.state_dict().items():
        torch.testing.assert_close(safe.state_dict()[name], value, **TIGHT, msg=f"{name} differs")


def test_without_a_process_group_it_is_safe_batch_norm():
    native, safe = _module_pair(4, 4)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    _assert_same_training(native, safe, x)
    _assert_same_training(native.eval(), safe.eval(), x)
    with pytest.raises(DegenerateBatchError, match="more than 1 value per channel"):
        safe.train()(torch.randn(1, 4, dtype=torch.float64))


def test_a_group_of_one_is_safe_batch_norm(tmp_path):
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        native, safe = _module_pair(4, 3)
        _assert_same_training(native, safe, torch.randn(5, 4, 6, dtype=torch.float64))
    finally:
        dist.destroy_process_group()


def test_traced_eager_forward_keeps_no_statistics_for_a_recomputation():
    """Tracing runs sync_batch_norm, a composite, on fake tensors: it gives its schema's shapes
    and keeps nothing for a recomputation, whose read then says what is missing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch_safebn import _ops

    with FakeTensorMode():
        x = torch.randn(4, 3, 2, 2)
        output, group_batch = _ops.OPS.sync_batch_norm(x, None, None, None, None, None, None, 0.1, 1e-5, "traced", 2,
                                                       424242)
    assert output.shape == x.shape and group_batch.shape == (2, 3) and group_batch.dtype == torch.int64
    with pytest.raises(RuntimeError, match="#424242 has made no synchronized forward over the process group traced"):
        _ops.group_statistics("traced", 424242)


@pytest.mark.parametrize("rows, expected", [
    ([[12, 3, 1], [8, 2, 1]], (20, 5, True)),
    ([[12, 3, 1], [8, 2, 0]], (20, 5, False)),  # rank 1's statistics were not finite
    ([[0, 0, 0], [1, 1, 1]], (1, 1, True)),  # an empty rank's flag says nothing: it sent no statistics
    ([[0, 0, 1], [0, 0, 1], [0, 0, 1]], (0, 0, True)),
])
def test_group_totals_reads_a_group_batch_as_the_ops_do(rows, expected):
    from torch_safebn import _ops

    assert _ops.group_totals(torch.tensor(rows)) == expected
    with pytest.raises(RuntimeError, match="group_batch must be the int64 CPU tensor"):
        _ops.group_totals(torch.tensor(rows, dtype=torch.float64))


def test_the_reference_fallback_synchronizes_too(tmp_path):
    """With _C unimportable, SafeSyncBatchNorm runs reference.py's ops: two ranks match one
    process's nn.BatchNorm2d on the whole batch (output, input and parameter gradients summed
    over the ranks, running statistics)."""
    script = tmp_path / "fallback_ranks.py"
    script.write_text(textwrap.dedent("""
        import os, sys, warnings
        sys.modules["torch_safebn._C"] = None  # the extension cannot load (each rank runs this too)
        import torch, torch.distributed as dist, torch.multiprocessing as mp

        def rank(r, init_method):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                import torch_safebn
            assert torch_safebn.backend() == "reference", torch_safebn.backend()
            dist.init_process_group("gloo", init_method=init_method, rank=r, world_size=2)
            close = dict(atol=1e-10, rtol=1e-10)
            whole = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            native, safe = torch.nn.BatchNorm2d(3).double(), torch_safebn.SafeSyncBatchNorm(3).double()
            expected_input, input = whole.clone().requires_grad_(), whole[3 * r:3 * r + 3].clone().requires_grad_()
            expected, output = native(expected_input), safe(input)
            expected.pow(2).sum().backward()
            output.pow(2).sum().backward()
            torch.testing.assert_close(output, expected[3 * r:3 * r + 3], **close)
            torch.testing.assert_close(input.grad, expected_input.grad[3 * r:3 * r + 3], **close)
            for mine, theirs in ((safe.weight.grad, native.weight.grad), (safe.bias.grad, native.bias.grad)):
                summed = mine.clone()
                dist.all_reduce(summed)
                torch.testing.assert_close(summed, theirs, **close)
            torch.testing.assert_close(safe.running_var, native.running_var, **close)
            dist.destroy_process_group()
            sys.stdout.flush()
            os._exit(0)  # as run_on_ranks' ranks: gloo may abort in interpreter finalization

        if __name__ == "__main__":
            mp.spawn(rank, args=(sys.argv[1],), nprocs=2)
            print("fallback ok")
    """))
    result = subprocess.run([sys.executable, str(script), (tmp_path / "rendezvous").as_uri()], capture_output=True,
                            text=True, cwd=ROOT, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-4000:]


def test_a_state_pickled_by_an_earlier_version_keeps_counts_by_rank_a_method():
    """torch.save(model) pickles each module's GroupSafetyState; one saved before counts_by_rank() was
    derived from group_batch holds counts_by_rank as a dict, which must not hide the method that
    describe() calls in every message of a synchronized module."""
    state = SafeSyncBatchNorm(4).safety_state.__getstate__()
    state["counts_by_rank"] = {0: 12, 1: 12}
    del state["group_batch"]
    loaded = GroupSafetyState.__new__(GroupSafetyState)
    loaded.__setstate__(state)
    assert loaded.counts_by_rank() == {} and loaded.group_batch.shape == (0, 3)


def test_a_synchronized_module_copies_and_pickles_without_a_warning():
    """copy.deepcopy (an EMA model) and torch.save/load of a whole model round-trip group_batch
    as the tensor it is, saying nothing."""
    import copy
    import io

    module = SafeSyncBatchNorm(4)
    module.safety_state.group_batch = torch.tensor([[12, 3, 1], [8, 2, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = copy.deepcopy(module)
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    for state in (copied.safety_state, loaded.safety_state):
        assert torch.equal(state.group_batch, module.safety_state.group_batch)


def test_a_state_pickled_with_group_batch_as_a_list_reads_it_as_the_ops_tensor():
    """Before group_batch was kept as the op's tensor, a state pickled it as a list of rows."""
    state = SafeSyncBatchNorm(4).safety_state.__getstate__()
    state["group_batch"], state["group_ranks"] = [[12, 3, 1], [8, 2, 1]], [0, 1]
    loaded = GroupSafetyState.__new__(GroupSafetyState)
    loaded.__setstate__(state)
    assert loaded.counts_by_rank() == {0: 12, 1: 8}
    assert loaded.group_batch.dtype == torch.int64 and loaded.group_batch.tolist() == [[12, 3, 1], [8, 2, 1]]


def test_checkpoints_load_both_ways_with_nn_sync_batch_norm():
    native = nn.SyncBatchNorm(4)
    with torch.no_grad():
        native.running_mean.uniform_()
    safe = SafeSyncBatchNorm(4, on_nonfinite="skip")
    safe.load_state_dict(native.state_dict(), strict=True)
    nn.SyncBatchNorm(4).load_state_dict(safe.state_dict(), strict=True)
    assert list(safe.state_dict()) == list(native.state_dict())
    assert torch.equal(safe.running_mean, native.running_mean)


def test_construction_is_validated_like_safe_batch_norm():
    with pytest.raises(ValueError, match="eps must be"):
        SafeSyncBatchNorm(4, eps=0.0)
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        SafeSyncBatchNorm(4, on_nonfinite="ignore")
    assert SafeSyncBatchNorm(4, 1e-3, 0.2, True, True, "group").process_group == "group"  # nn.SyncBatchNorm's order


def test_convert_model_distributed_and_back():
    group = object()  # any process group object: conversion only carries it
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(4), nn.SyncBatchNorm(5)), nn.BatchNorm3d(6))
    model[1][1].process_group = group
    with torch.no_grad():
        model[0].running_mean.fill_(0.5)
    torch_safebn.convert_model(model, distributed=True, on_nonfinite="warn")
    bns = [model[0], model[1][0], model[1][1], model[2]]
    assert all(type(m) is SafeSyncBatchNorm and m.policy.on_nonfinite == "warn" for m in bns)
    assert [m.process_group for m in bns] == [None, None, group, None]
    assert model[1][1].safety_state.name == "1.1"
    assert torch.equal(model[0].running_mean, torch.full((3,), 0.5))

    torch_safebn.revert_model(model)
    assert all(type(m) is nn.SyncBatchNorm for m in [model[0], model[1][0], model[1][1], model[2]])
    assert model[1][1].process_group is group and torch.equal(model[0].running_mean, torch.full((3,), 0.5))

    other = object()
    torch_safebn.convert_model(model, distributed=True, process_group=other)
    assert all(m.process_group is other for m in [model[0], model[1][0], model[1][1], model[2]])


def test_convert_model_makes_nn_sync_batch_norm_safe():
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3)))
    assert [type(m) for m in model] == [torch_safebn.SafeBatchNorm2d, SafeSyncBatchNorm]
