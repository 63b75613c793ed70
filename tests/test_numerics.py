"""Accumulation accuracy: statistics of large-offset data in float32, bfloat16 rounding, every walk
of the CPU kernels (thread counts, ghost chunks, outputs written with non-temporal stores)."""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import LAYOUTS, forward_eval, forward_train, make_input
from torch_safebn.contract import Activation

OPS = torch.ops.safebn
SILU = int(Activation.SILU)


@pytest.mark.parametrize("shape,layout", [((64, 2, 128, 128), "contiguous"), ((64, 2, 128, 128), "channels_last"),
                                          ((16, 64, 32, 32), "channels_last"),  # rows folded into one piece
                                          ((1_000_000, 2), "contiguous")])
def test_large_offset_variance_in_float32(shape, layout):
    """1e4 + N(0, 1): a naive sum of squares in float32 loses every digit of
    the variance; Welford with a Chan merge keeps it within 1e-4 relative."""
    x64 = make_input(shape, torch.float64, layout, offset=1e4, scale=1.0)
    var64, mean64 = torch.var_mean(x64, dim=[d for d in range(x64.dim()) if d != 1], correction=0)
    mean, var = OPS.batch_stats(x64.float())
    assert torch.allclose(var.double(), var64, rtol=1e-4, atol=0), (var, var64)
    assert torch.allclose(mean.double(), mean64, rtol=1e-7, atol=0)
    _, _, invstd = forward_train(x64.float(), None, None, 1e-5)
    assert torch.allclose(invstd.double(), torch.rsqrt(var64 + 1e-5), rtol=1e-4, atol=0)


def test_large_offset_normalized_output_in_float32():
    x64 = make_input((32, 3, 32, 32), torch.float64, offset=1e4)
    y, _, _ = forward_train(x64.float(), None, None, 1e-5)
    y64, _, _ = forward_train(x64, None, None, 1e-5)
    # x - mean is exact to float32's spacing at 1e4 (~1e-3); nothing is lost beyond that
    assert (y.double() - y64).abs().max() < 2e-3


def _with_special_values(shape, layout, seed):
    """bfloat16 values with NaN, +-inf and values near the largest finite one, in `layout`."""
    x = make_input(shape, torch.float64, seed=seed).flatten()
    x[::5] = float("nan")
    x[1::7] = float("inf")
    x[2::11] = -float("inf")
    x[3::13] = 3.3e38  # times the weight, past bfloat16's largest finite value
    return x.view(shape).to(torch.bfloat16).contiguous(memory_format=LAYOUTS[layout])


def assert_same_bits(actual, expected):
    """Equal bit for bit, but for NaN, whose bits torch itself writes two ways (0x7fc0 from
    c10::BFloat16, 0xffff from its vectorized conversion)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("shape,layout", [
    ((3, 5, 7), "contiguous"),      # rows of 35 values, an odd width: value by value
    ((3, 5, 33), "contiguous"),     # rows of 33 gone one by one: 16 pairs and a last value
    ((2, 5, 64), "contiguous"),
    ((4, 8), "contiguous"),         # rows of an even width: pairs across channels
    ((4, 7), "contiguous"),         # an odd width: value by value
    ((3, 5, 3, 3), "channels_last"),  # odd C: rows of two pixels
    ((2, 6, 8, 8), "channels_last"),
])
def test_bfloat16_rounds_like_torch_in_every_walk(shape, layout):
    """bfloat16 is read and written in pairs where the layout allows (scalar_types.h). With the
    statistics chosen so that every product is exact in float32, y = x * weight and
    dx = dy * weight must round to nearest even exactly as torch's conversion does, NaN, inf and
    overflow included, whichever of a pair a value is and in a run's last odd value."""
    channels = shape[1]
    eps = 2.0**-10
    weight = 1 + torch.arange(1, channels + 1, dtype=torch.float32) * 2.0**-9  # 10 significant bits
    zeros, var = torch.zeros(channels), torch.full((channels,), 1 - eps)  # var + eps == 1: invstd is 1
    x = _with_special_values(shape, layout, seed=0)
    per_channel = [-1 if d == 1 else 1 for d in range(len(shape))]
    per_channel[1] = channels
    w = weight.view(per_channel)

    y = forward_eval(x, weight, zeros, zeros, var, eps)
    assert y.stride() == x.stride()
    assert_same_bits(y, ((x.float() - 0) * w + 0).to(torch.bfloat16))

    finite_x = make_input(shape, torch.bfloat16, layout, seed=1)
    dy = _with_special_values(shape, layout, seed=2)
    dx, _, _ = OPS.backward(dy, finite_x, weight, None, zeros, torch.ones(channels), False, [True, False, False])
    assert_same_bits(dx, (dy.float() * w).to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 5, 33), (3, 5, 65), (15, 17, 143), (2, 3, 1025), (5, 2, 3001),
                                   (5, 70, 33)])
def test_bfloat16_statistics_count_every_value(shape, two_threads):
    """The sums take bfloat16 in pairs: a run of odd length (S = 7, 33, 65, 143, 1025) leaves a last
    value outside them, rows walked one by one (S = 65, 143) start at odd positions, the two tasks of
    (15, 17, 143) split its rows mid-channel (at row 128 of 255), and slices of a plane ((5, 2, 3001) is
    split across tasks) start mid-row at odd positions; rows wider than a strip ((5, 70, 33): 2310
    values) are summed two at a time, an odd one left to sum alone. None may be dropped or counted
    twice: a value more or less moves the mean ~1e-3."""
    x = make_input(shape, torch.bfloat16)
    var64, mean64 = torch.var_mean(x.double(), dim=[0, 2], correction=0)
    mean, var = OPS.batch_stats(x)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 64, 17, 16), (8, 32, 33, 9), (3, 16, 7, 5), (1, 64, 3, 3)])
def test_channels_last_rows_folded_into_one_piece(shape, dtype, two_threads):
    """Channels-last rows whose channels repeat within a piece of register sums (C = 64, 32, 16 on
    AVX-512; 32, 16 on AVX2) are summed a row at a time, each of the row's pieces added onto the
    first (kernel_impl.h, sum_blocks), for the statistics and the gradient's sums alike; (3, 16, 7, 5)
    ends in a block too narrow to fold, (1, 64, 3, 3) in one of a single piece (AVX-512). Every value
    must land in its channel: the statistics, and the weight's and bias's gradients, against
    float64."""
    x = make_input(shape, dtype, "channels_last")
    dy = make_input(shape, dtype, "channels_last", seed=1)
    channels = shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    _, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, 0.1, 1e-5, 0, 0.0, 0)
    _, dw, db = OPS.backward(dy, x, weight, bias, mean, invstd, True, [False, True, True], 0, 0.0, 0)
    x64, dy64 = x.double(), dy.double()
    dims = [0, 2, 3]
    var64, mean64 = torch.var_mean(x64, dim=dims, correction=0)
    invstd64 = (var64 + 1e-5).rsqrt()
    per_channel = (1, channels, 1, 1)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd.double(), invstd64, rtol=1e-5, atol=0)
    # the gradient's sums at the kernel's own statistics, so that only the sums are compared
    xhat = (x64 - mean.double().view(per_channel)) * invstd.double().view(per_channel)
    torch.testing.assert_close(db.double(), dy64.sum(dims), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.double(), (dy64 * xhat).sum(dims), rtol=1e-5, atol=1e-4)


@pytest.fixture(params=[3, 4, 8])
def many_threads(request):
    """More threads than this machine has cores: a pass splits a small batch into more tasks than
    it has rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape,layout,chunk", [
    ((5, 512, 7, 7), "contiguous", 0),     # rows split 2, 2, 1 and an empty fourth task (4 threads)
    ((9, 512, 7, 7), "contiguous", 0),
    ((5, 512, 7, 7), "contiguous", 2),     # chunks of 2, 2 and 1 examples
    ((5, 64, 9, 9), "channels_last", 0),
    ((7, 96, 5, 5), "channels_last", 3),
    ((6, 3, 40, 40), "contiguous", 4),     # planes, each chunk's fused
    ((5, 3, 64, 64), "contiguous", 4),     # planes: the first chunk's sliced (3 threads or more), the last's fused
])
def test_every_thread_count_counts_every_value(shape, layout, chunk, many_threads):
    """The statistics, output and gradients of a training forward + backward, whole batch or ghost
    chunks, against float64 chunk by chunk, whatever the number of tasks per pass."""
    x = make_input(shape, layout=layout)
    dy = make_input(shape, layout=layout, seed=1)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    output, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, 0.1, 1e-5, 0, 0.0, chunk)
    dx, dw, db = OPS.backward(dy, x, weight, bias, mean, invstd, True, [True, True, True], 0, 0.0, chunk)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    parts = x64.split(chunk) if chunk else [x64]
    expected = torch.cat([torch.nn.functional.batch_norm(part, None, None, w64, b64, training=True, eps=1e-5)
                          for part in parts])
    expected.backward(dy.double())
    var64, mean64 = zip(*(torch.var_mean(part.detach(), dim=[0, 2, 3], correction=0) for part in parts))
    torch.testing.assert_close(mean.double().reshape(-1), torch.cat(mean64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd.double().reshape(-1), (torch.cat(var64) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(output.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(db.double(), b64.grad, rtol=1e-4, atol=1e-3)


def _into_a_poisoned_block(call):
    """call() once more after its first output, filled with NaN, was freed: the second output
    lands on that block (csrc/cpu/large_buffers.h), so that a value no store wrote shows as NaN."""
    first = call()
    first.fill_(float("nan"))
    address = first.data_ptr()
    del first
    second = call()
    assert second.data_ptr() == address, "the output did not reuse the poisoned block"
    return second


@pytest.mark.parametrize("shape,dtype,layout,chunk,activation", [
    ((6, 16, 255, 261), torch.float32, "contiguous", 0, 0),   # planes fused, runs starting mid cache line
    ((24, 2, 512, 260), torch.float32, "contiguous", 0, 0),   # planes sliced
    ((820, 64, 11, 11), torch.float32, "contiguous", 0, 0),   # rows of 121, several to a tile
    ((1640, 64, 11, 11), torch.bfloat16, "contiguous", 0, 0),  # rows starting at odd values
    ((12288, 515), torch.float32, "contiguous", 0, 0),         # blocks wider than a tile, in pieces
    ((96, 64, 32, 33), torch.float32, "channels_last", 0, 0),  # blocks of 4 pixels
    ((96, 64, 32, 33), torch.float32, "channels_last", 16, SILU),  # ghost chunks; dx from dz in place, cached
    ((96, 3, 150, 150), torch.float32, "channels_last", 0, 0),  # blocks of 258 values
    ((96, 128, 32, 33), torch.bfloat16, "channels_last", 0, SILU),  # bfloat16 in pairs
    ((12288, 1030), torch.bfloat16, "contiguous", 0, 0),  # pairs in pieces of rows that start mid-line
])
def test_outputs_of_24_mib_and_more_are_streamed_whole(shape, dtype, layout, chunk, activation, two_threads):
    """From 24 MiB on, the forward's and eval's output and the input gradient (but where it is
    computed in place from SiLU's dz) are written with non-temporal stores through a tile
    (csrc/cpu/passes.h, output_store; kernel_impl.h, write_rows): every value, in every walk,
    against float64."""
    assert torch.empty(shape, dtype=dtype).nbytes >= 24 << 20
    C = shape[1]
    x = make_input(shape, dtype, layout)
    dy = make_input(shape, dtype, layout, seed=1)
    weight, bias = torch.rand(C) + 0.5, torch.randn(C)
    running_mean, running_var = torch.randn(C), torch.rand(C) + 0.5
    gc.collect()
    gc.disable()
    try:
        output = _into_a_poisoned_block(lambda: OPS.forward_train(
            x, weight, bias, None, None, None, None, 0.1, 1e-5, activation, 0.0, chunk)[0])
        _, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, 0.1, 1e-5, activation, 0.0, chunk)
        dx = _into_a_poisoned_block(lambda: OPS.backward(
            dy, x, weight, bias, mean, invstd, True, [True, False, False], activation, 0.0, chunk)[0])
        evaluated = _into_a_poisoned_block(lambda: OPS.batch_norm_eval(
            x, weight, bias, running_mean, running_var, None, 1e-5, activation, 0.0))
    finally:
        gc.enable()
    act = torch.nn.functional.silu if activation == SILU else (lambda t: t)
    x64 = x.double().requires_grad_()
    parts = x64.split(chunk) if chunk else [x64]
    expected = act(torch.cat([torch.nn.functional.batch_norm(part, None, None, weight.double(), bias.double(),
                                                             training=True, eps=1e-5) for part in parts]))
    expected.backward(dy.double())
    expected_eval = act(torch.nn.functional.batch_norm(x.double(), running_mean.double(), running_var.double(),
                                                       weight.double(), bias.double(), eps=1e-5))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, got, want in (("output", output, expected.detach()), ("eval", evaluated, expected_eval),
                            ("grad_input", dx, x64.grad)):
        assert got.stride() == x.stride(), name
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
