"""Running statistics that native batch norm gets wrong, pooled exactly:
activation checkpointing updates once per step, accumulate_stats pools
micro-batches, recalibrate sets exact statistics from data. Float64
parity against what each promises."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torch_safebn
from torch_safebn import NonFiniteError

TIGHT = {"atol": 1e-12, "rtol": 1e-12}


def _block(seed=0, **options):
    torch.manual_seed(seed)
    native = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                           nn.BatchNorm2d(4, momentum=None), nn.SiLU()).double()
    return torch_safebn.convert_model(native, **options)


def _state(model):
    """Every buffer, counters included."""
    return {name: value.clone() for name, value in model.named_buffers()}


class Checkpointed(nn.Module):
    def __init__(self, block, use_reentrant):
        super().__init__()
        self.block, self.use_reentrant = block, use_reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def _train(model, steps=3, seed=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 3, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_checkpointed_block_updates_as_an_unchecked_one(use_reentrant, compiled):
    """Three steps of a checkpointed block and of its plain twin leave the same buffers: eager,
    bit for bit. Compiled, the counters and num_batches_tracked are equal and the running
    statistics agree to float64's rounding: inductor computes the statistics that the checkpointed
    backward recomputes in a kernel fused otherwise than the forward's (lowering.py puts the
    guard between the statistics and the normalization), so the gradients, and through them the
    next steps' batch statistics, differ in their last bits. A second update (checkpoint_aware=False,
    eager) moves the first layer's running mean by 0.03 and advances num_batches_tracked, which
    stays exact."""
    if compiled and use_reentrant:
        pytest.skip("torch.compile supports non-reentrant checkpointing only")
    torch._dynamo.reset()
    plain, checked = _block(), Checkpointed(_block(), use_reentrant)
    for model in (plain, checked):
        _train(torch.compile(model, fullgraph=True) if compiled else model)
    for name, value in _state(plain).items():
        if compiled and value.is_floating_point():
            torch.testing.assert_close(_state(checked.block)[name], value, rtol=0, atol=1e-12, msg=name)
        else:
            assert torch.equal(_state(checked.block)[name], value), name
    assert checked.block[1].num_batches_tracked.item() == 3
    assert torch_safebn.report(checked.block).rows[0]["batches"] == 3


def test_checkpoint_aware_false_updates_on_the_recomputation_as_native():
    native = Checkpointed(_block(), use_reentrant=False)
    torch_safebn.revert_model(native.block)
    safe = Checkpointed(_block(checkpoint_aware=False), use_reentrant=False)
    _train(native, steps=2)
    _train(safe, steps=2)
    assert safe.block[1].num_batches_tracked.item() == native.block[1].num_batches_tracked.item() == 4
    torch.testing.assert_close(safe.block[1].running_var, native.block[1].running_var, **TIGHT)


@pytest.mark.parametrize("sizes", [(8, 8, 8, 8), (8, 5, 11, 8)], ids=["even", "uneven"])
def test_accumulated_micro_batches_update_as_one_batch(sizes):
    """The first batch norm against one batch of all the micro-batches; every batch norm against
    the pooled statistics of the inputs it saw (a deeper one sees what the first normalized with
    each micro-batch's statistics). momentum 0.1 and None."""
    whole, accumulated = _block(), _block()
    x = torch.randn(sum(sizes), 3, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole(x)
    seen = {1: [], 4: []}
    hooks = [accumulated[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach()))
             for i in seen]
    with torch_safebn.accumulate_stats(accumulated):
        for chunk in x.split(sizes):
            accumulated(chunk)
        assert accumulated[1].num_batches_tracked.item() == 0, "no update before the context exits"
    for hook in hooks:
        hook.remove()
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(_state(accumulated)[name], _state(whole)[name], **TIGHT, msg=name)
    for i, momentum in ((1, 0.1), (4, 1.0)):  # momentum=None, first batch: a cumulative average of one
        var, mean = torch.var_mean(torch.cat(seen[i]), dim=[0, 2, 3], correction=1)
        torch.testing.assert_close(accumulated[i].running_mean, momentum * mean, **TIGHT)
        torch.testing.assert_close(accumulated[i].running_var, (1 - momentum) + momentum * var, **TIGHT)
        assert accumulated[i].num_batches_tracked.item() == 1
    assert torch_safebn.report(accumulated).rows[0]["batches"] == 1


def test_accumulate_stats_reports_a_nonfinite_micro_batch_at_the_exit():
    model = _block()
    before = _state(model)
    x = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="'1' at training step 0"):
        with torch_safebn.accumulate_stats(model):
            model(x)
            x[0, 0, 0, 0] = float("nan")
            model(x)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(_state(model)[name], before[name]), name


def test_accumulate_stats_updates_nothing_when_its_body_raises():
    model = _block()
    before = _state(model)
    with pytest.raises(KeyError):
        with torch_safebn.accumulate_stats(model):
            model(torch.randn(4, 3, 7, 7, dtype=torch.float64))
            raise KeyError("the step failed")
    for name, value in before.items():
        assert torch.equal(_state(model)[name], value), name
    model(torch.randn(4, 3, 7, 7, dtype=torch.float64))  # and the model trains as before
    assert model[1].num_batches_tracked.item() == 1


def test_recalibrate_sets_the_exact_pooled_statistics_of_each_input():
    torch.manual_seed(0)
    model = torch_safebn.convert_model(nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(6, 4, 3),
        nn.BatchNorm2d(4))).double().train()
    native_bn = nn.BatchNorm2d(4, dtype=torch.float64)  # a batch norm left native is recalibrated too
    model.append(native_bn)
    recorded = {1: [], 5: [], 6: []}
    dropout_modes = []
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: recorded[i].append(a[0].detach().clone()))
             for i in recorded]
    hooks.append(model[2].register_forward_pre_hook(lambda m, a: dropout_modes.append(m.training)))
    batches = [(torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.zeros(n)) for n in (4, 7, 3)]
    report = torch_safebn.recalibrate(model, batches, progress=False)
    for hook in hooks:
        hook.remove()
    assert dropout_modes == [False] * 3 and model.training and model[2].training, "modes restored"
    for i, inputs in recorded.items():
        x = torch.cat(inputs)
        var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=1)
        torch.testing.assert_close(model[i].running_mean, mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model[i].running_var, var, atol=1e-10, rtol=1e-10)
    assert [row["module"] for row in report.rows] == ["1", "5", "6"]
    assert all(row["shift"] > 0 for row in report.rows) and "max mean shift" in str(report)


def test_recalibrate_reads_num_batches_and_a_custom_forward():
    model = _block()
    seen = []

    def forward(m, batch):
        seen.append(batch["x"].shape[0])
        m(batch["x"])

    torch_safebn.recalibrate(model, ({"x": torch.randn(n, 3, 7, 7, dtype=torch.float64)} for n in (2, 3, 4)),
                             forward=forward, num_batches=2, progress=False)
    assert seen == [2, 3]


# -- ghost batch norm ------------------------------------------------------------------------------
def _chunkwise(native, x, k, act=None):
    """Native batch norm applied chunk by chunk, each with its own statistics."""
    parts = [F.batch_norm(c, None, None, native.weight, native.bias, True, 0.0, native.eps) for c in x.split(k)]
    y = torch.cat(parts)
    return act(y) if act is not None else y


@pytest.mark.parametrize("k", [4, 5, 16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_ghost_batches_are_normalized_chunk_by_chunk(k, layout, act):
    torch.manual_seed(0)
    native = nn.BatchNorm2d(6, dtype=torch.float64)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.normal_()
    safe = torch_safebn.SafeBatchNormAct2d(6, act=act, virtual_batch_size=k, dtype=torch.float64)
    safe.load_state_dict(native.state_dict())
    x = torch.randn(18, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=layout)
    grad = torch.randn_like(x)
    expected_x, x_safe = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = _chunkwise(native, expected_x, k, nn.SiLU() if act else None)
    output = safe(x_safe)
    torch.testing.assert_close(output, expected, **TIGHT)
    assert output.is_contiguous(memory_format=layout)
    expected.backward(grad)
    output.backward(grad)
    torch.testing.assert_close(x_safe.grad, expected_x.grad, **TIGHT)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(safe, name).grad, getattr(native, name).grad, **TIGHT)
    native(x)  # the running statistics: once, from the whole batch
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(safe, name), getattr(native, name), **TIGHT, msg=name)
    safe.eval(), native.eval()
    torch.testing.assert_close(safe(x), (nn.SiLU() if act else nn.Identity())(native(x)), **TIGHT)


def test_ghost_batch_norm_gradients_and_ops():
    x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def ghost(x, w, b):
        return torch.ops.safebn.forward_train(x, w, b, None, None, None, None, 0.1, 1e-5, 0, 0.0, 3)[0]

    torch.autograd.gradcheck(ghost, (x, w, b))
    torch.autograd.gradgradcheck(ghost, (x, w, b))
    buffers = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0),
               torch.zeros(torch_safebn.contract.NUM_COUNTERS, dtype=torch.int64))
    torch.library.opcheck(torch.ops.safebn.forward_train.default, (x, w, b, *buffers, 0.1, 1e-5, 0, 0.0, 3))
    _, mean, invstd = torch.ops.safebn.forward_train(x, w, b, None, None, None, None, 0.1, 1e-5, 0, 0.0, 3)
    assert mean.shape == invstd.shape == (3, 3)
    torch.library.opcheck(torch.ops.safebn.backward.default,
                          (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, invstd, True,
                           [True, True, True], 0, 0.0, 3))


def test_a_ghost_chunk_of_one_value_per_channel_is_degenerate():
    safe = torch_safebn.SafeBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(torch_safebn.DegenerateBatchError, match="more than 1 value per channel"):
        safe(torch.randn(5, 3))  # chunks of 4 and 1
    with pytest.raises(ValueError, match="virtual_batch_size must be None or a whole number"):
        torch_safebn.SafeBatchNorm2d(3, virtual_batch_size=0)
    with pytest.raises(ValueError, match="SafeSyncBatchNorm has no virtual_batch_size"):
        torch_safebn.SafeSyncBatchNorm(3, virtual_batch_size=4)
