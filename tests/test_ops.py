"""The registered ops themselves: opcheck (schema, fake kernel, autograd
registration), the contract the extension and the fallback share, and the
counters layout."""
from __future__ import annotations

import gc
import resource

import pytest
import torch

import torch_safebn
from conftest import LAYOUTS, forward_eval, forward_train, make_input
from torch_safebn import _ops, contract, reference
from torch_safebn.contract import NUM_COUNTERS, Counter

OPS = torch.ops.safebn
CASES = [
    ((4, 6, 5, 3), torch.float32, "contiguous"),
    ((4, 6, 5, 3), torch.float32, "channels_last"),
    ((8, 5), torch.float64, "contiguous"),
    ((3, 4, 7), torch.bfloat16, "contiguous"),
    ((2, 3, 2, 3, 4), torch.float16, "channels_last_3d"),
]


def _args(shape, dtype, layout, requires_grad=False):
    x = make_input(shape, dtype, layout).requires_grad_(requires_grad)
    C = shape[1]
    acc = reference.accumulate_dtype(dtype)
    w = (torch.rand(C, dtype=acc) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(C, dtype=acc).requires_grad_(requires_grad)
    return x, w, b


def _buffers(C, acc, nbt=0):
    """running_mean, running_var, num_batches_tracked and counters of a fresh module."""
    return torch.zeros(C, dtype=acc), torch.ones(C, dtype=acc), torch.tensor(nbt), torch.zeros(NUM_COUNTERS, dtype=torch.int64)


@pytest.mark.parametrize("shape,dtype,layout", CASES)
def test_opcheck_every_op(shape, dtype, layout):
    x, w, b = _args(shape, dtype, layout, requires_grad=True)
    C, acc = shape[1], reference.accumulate_dtype(dtype)
    eps = 1e-5
    mean, var = OPS.batch_stats(x.detach())
    invstd = torch.rsqrt(var + eps)
    grad = make_input(shape, dtype, layout, seed=7)
    sums = OPS.backward_reduce(grad, x.detach(), mean, invstd, w.detach(), b.detach(), [True, True])[0]
    count = x.numel() // C
    calls = [
        (OPS.forward_train.default, (x, w, b, *_buffers(C, acc), 0.1, eps)),
        (OPS.forward_train.default, (x, w, b, *_buffers(C, acc, nbt=3), None, eps)),  # cumulative average
        (OPS.forward_train.default, (x, None, None, None, None, None, None, 0.1, eps)),
        (OPS.batch_norm_train.default, (x, w, b, *_buffers(C, acc), 0.1, eps)),
        (OPS.batch_norm_eval.default, (x, w, b, mean, var, torch.zeros(NUM_COUNTERS, dtype=torch.int64), eps)),
        (OPS.batch_norm_eval.default, (x, None, None, mean, var, None, eps)),
        (OPS.backward.default, (grad, x.detach(), w.detach(), b.detach(), mean, invstd, True, [True, True, True])),
        (OPS.backward.default, (grad, x.detach(), w.detach(), None, mean, invstd, False, [True, False, True])),
        (OPS.batch_stats.default, (x.detach(),)),
        (OPS.normalize.default, (x.detach(), w.detach(), b.detach(), mean, invstd)),
        (OPS.backward_reduce.default, (grad, x.detach(), mean, invstd, w.detach(), b.detach(), [True, True])),
        (OPS.backward_reduce.default, (grad, x.detach(), mean, invstd, None, None, [False, False])),
        (OPS.backward_elemt.default, (grad, x.detach(), w.detach(), mean, invstd, sums, count)),
        (OPS.update_running_stats.default, (*_buffers(C, acc), mean, invstd, w.detach(), b.detach(), count, eps, None)),
        (OPS.update_running_stats.default, (*_buffers(C, acc), mean, invstd, None, None, count, eps, 0.1, True)),
        (OPS.check_running_stats.default, (_buffers(C, acc)[3], mean, var, w.detach(), b.detach(), eps)),
        (OPS.check_running_stats.default, (_buffers(C, acc)[3], mean, torch.full_like(var, float("nan")), None,
                                           None, eps)),  # one that writes the counters
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


def test_opcheck_a_skipped_update():
    """The guard's other branch: a float16 batch whose variance would overflow float16 buffers
    (its NaN-free outputs let opcheck compare them)."""
    x = make_input((4, 3, 2, 2), torch.float16, scale=2e4).requires_grad_()
    assert torch.isfinite(x).all()
    running_mean, running_var = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    args = (x, None, None, running_mean, running_var, torch.tensor(0), counters, 0.1, 1e-5)
    torch.library.opcheck(OPS.forward_train.default, args)
    OPS.forward_train(*args)
    assert counters[Counter.SKIPPED_UPDATES] == 1 and torch.equal(running_var, torch.ones(3, dtype=torch.float16))


def test_opcheck_observe():
    """The host's op: a module's state acts on its counters (here: nothing to report)."""
    bn = torch_safebn.SafeBatchNorm2d(3)
    bn(make_input((4, 3, 2, 2)))
    torch.library.opcheck(OPS.observe.default, (bn.safety_counters, bn.safety_state.id, [4, 3, 2, 2], 0))


def test_the_compiled_extension_is_loaded():
    """The suite runs against the kernels (make test builds them); a build that fails to load
    (an undefined symbol, say) would otherwise pass on the fallback."""
    assert _ops.BACKEND in ("cpu", "cuda+cpu"), "torch_safebn._C did not load: see the warning at import"


def test_the_extension_was_built_from_this_contract():
    """The schemas the fallback registers come from the file the extension was
    compiled from (ops.def): a stale build would disagree. Compared parsed, as
    torch prints a schema in its own spelling (a string default in double quotes)."""
    for name, schema in contract.SCHEMAS.items():
        assert getattr(OPS, name).default._schema == torch._C.parse_schema(f"safebn::{name}{schema}"), name


def _update(counters, mean, invstd, weight=None, running=None, count=8, momentum=0.1):
    rm, rv, nbt = running if running is not None else (None, None, None)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, weight, None, count, 1e-5, momentum)


def test_counter_slots_agree_with_the_kernels():
    """Each slot named in safety.Counter is the one the C++ code writes."""
    c = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    ok = torch.ones(3)
    _update(c, ok, ok)
    assert c.tolist() == [1] + [0] * (NUM_COUNTERS - 1)
    _update(c, ok, ok)
    _update(c, torch.tensor([float("nan"), 0.0, 0.0]), ok, weight=torch.tensor([1.0, float("inf"), float("inf")]))
    assert c[Counter.BATCHES] == 3 and c[Counter.SKIPPED_UPDATES] == 1 and c[Counter.NONFINITE_EVENTS] == 1
    assert c[Counter.EVENT_STEP] == 2 and c[Counter.EVENT_IN_TRAINING] == 1 and c[Counter.REPORTED_EVENTS] == 0
    assert c[Counter.BAD_MEAN_CHANNELS] == 1 and c[Counter.BAD_WEIGHT_CHANNELS] == 2
    assert c[Counter.BAD_VAR_CHANNELS] == 0 and c[Counter.BAD_BIAS_CHANNELS] == 0
    _update(c, torch.zeros(3), torch.full((3,), 1e5))  # variance 1e-10 - far below eps
    assert c[Counter.LOW_VARIANCE_CHANNELS] == 3
    assert len(Counter) == NUM_COUNTERS == c.numel()


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_the_first_unreported_event_is_the_one_described(impl):
    """A later event does not overwrite the description of one the host has not
    reported; once the host marks it reported, the next event is described."""
    update = OPS.update_running_stats if impl == "compiled" else reference.update_running_stats
    c = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    ok, nan = torch.ones(3), torch.tensor([float("nan"), 0.0, 0.0])
    for mean, weight in ((ok, None), (nan, None), (ok, torch.tensor([float("inf")] * 3))):
        update(None, None, None, c, mean, ok, weight, None, 8, 1e-5, 0.1)
    assert c[Counter.NONFINITE_EVENTS] == 2 and c[Counter.EVENT_STEP] == 1
    assert c[Counter.BAD_MEAN_CHANNELS] == 1 and c[Counter.BAD_WEIGHT_CHANNELS] == 0
    c[Counter.REPORTED_EVENTS] = 2
    update(None, None, None, c, ok, ok, torch.tensor([1.0, float("inf"), 1.0]), None, 8, 1e-5, 0.1)
    assert c[Counter.EVENT_STEP] == 3 and c[Counter.BAD_WEIGHT_CHANNELS] == 1 and c[Counter.BAD_MEAN_CHANNELS] == 0


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_update_rules_of_compiled_and_reference_agree(impl):
    update = OPS.update_running_stats if impl == "compiled" else reference.update_running_stats
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(4)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    mean, invstd = torch.tensor([1.0, 2.0, 3.0]), torch.rsqrt(torch.tensor([4.0, 1.0, 0.25]) + 1e-5)
    update(rm, rv, nbt, counters, mean, invstd, None, None, 5, 1e-5, None)  # cumulative: factor 1/5
    torch.testing.assert_close(rm, mean / 5)
    torch.testing.assert_close(rv, 0.8 + torch.tensor([4.0, 1.0, 0.25]) * 5 / 4 / 5)
    assert nbt.item() == 5
    update(rm, rv, nbt, counters, mean, invstd, None, torch.tensor([0.0, float("nan"), 0.0]), 5, 1e-5, 0.1)
    assert nbt.item() == 5 and counters[Counter.BAD_BIAS_CHANNELS] == 1
    update(rm, rv, nbt, counters, mean, invstd, None, None, 1, 1e-5, 0.1)  # one value: nothing to learn
    assert counters[Counter.SKIPPED_UPDATES] == 2 and counters[Counter.BATCHES] == 3
    half_rm, half_rv = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    update(half_rm, half_rv, None, counters, mean, torch.full((3,), 1e-4), None, None, 5, 1e-5, 0.5)
    assert torch.equal(half_rv, torch.ones(3, dtype=torch.float16)), "an update overflowing float16 is skipped"
    assert counters[Counter.NONFINITE_EVENTS] == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_an_input_without_channels_gives_empty_results(layout):
    """C = 0: nothing to compute (native raises an IndexError); planning the walk must not
    divide by the channel count, which would end the process."""
    x = torch.randn(4, 0, 5, 5).contiguous(memory_format=LAYOUTS[layout])
    empty = torch.zeros(0)
    y, mean, invstd = forward_train(x)
    assert y.shape == x.shape and mean.numel() == invstd.numel() == 0
    assert forward_eval(x, None, None, empty, empty).shape == x.shape
    for train in (True, False):
        dx, dw, db = torch.ops.safebn.backward(x, x, empty, None, empty, empty, train, [True, True, True])
        assert dx.shape == x.shape and dw.numel() == db.numel() == 0
    assert [t.numel() for t in torch.ops.safebn.batch_stats(x)] == [0, 0]


@pytest.mark.parametrize("op", ["backward", "backward_reduce", "backward_elemt", "sync_batch_norm_backward"])
def test_every_backward_refuses_a_gradient_of_another_shape(op):
    """grad_output must have the input's shape; SafeSyncBatchNorm's backward
    checks it before laying the gradient out like the input (a 3-d gradient
    cannot be made channels_last) and before its collective."""
    x, w, b = (t.detach() for t in _args((4, 6, 5, 3), torch.float32, "channels_last"))
    mean, var = OPS.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    sums = OPS.backward_reduce(torch.ones_like(x), x, mean, invstd, w, b, [False, False])[0]
    grad = torch.ones(4, 6, 5)
    group_batch = torch.tensor([[60, 4, 1], [60, 4, 1]])  # two ranks; no process group is reached
    calls = {
        "backward": lambda: OPS.backward(grad, x, w, b, mean, invstd, True, [True, True, True]),
        "backward_reduce": lambda: OPS.backward_reduce(grad, x, mean, invstd, w, b, [True, True]),
        "backward_elemt": lambda: OPS.backward_elemt(grad, x, w, mean, invstd, sums, 120),
        "sync_batch_norm_backward": lambda: OPS.sync_batch_norm_backward(grad, x, w, b, mean, invstd, group_batch,
                                                                         "no group", [True, True, True]),
    }
    with pytest.raises(RuntimeError, match=r"grad_output has shape \[4, 6, 5\] but the input has shape \[4, 6, 5, 3\]"):
        calls[op]()


@pytest.mark.parametrize("shape,dtype,layout", CASES)
@pytest.mark.parametrize("activation", [0, 2])
def test_the_split_backward_matches_the_reference_in_float64(shape, dtype, layout, activation):
    """backward_reduce's [2, C] sums and this process's parameter gradients
    (in the weight's dtype), and backward_elemt from those sums, against
    reference.py in float64; together they make the one-op backward."""
    x, w, b = _args(shape, dtype, layout)
    mean, var = OPS.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    dy = make_input(shape, dtype, layout, seed=5)
    f64 = [t.double() for t in (dy, x, mean, invstd, w, b)]
    sums, grad_weight, grad_bias = OPS.backward_reduce(dy, x, mean, invstd, w, b, [True, True], activation, 0.0)
    want = reference.backward_reduce(*f64, [True, True], activation, 0.0)
    assert sums.shape == (2, shape[1]) and sums.dtype == mean.dtype
    assert grad_weight.dtype == grad_bias.dtype == w.dtype
    tol = {torch.float64: 1e-10}.get(dtype, 1e-4 if dtype == torch.float32 else 2e-2)
    for name, got, expected in zip(("sums", "grad_weight", "grad_bias"), (sums, grad_weight, grad_bias), want):
        scale = expected.abs().max().item() + 1.0
        assert (got.double() - expected).abs().max().item() <= tol * scale, name
    count = x.numel() // shape[1]
    got = OPS.backward_elemt(dy, x, w, mean, invstd, sums, count, b, activation, 0.0)
    expected = reference.backward_elemt(*f64[:2], f64[4], f64[2], f64[3], sums.double(), count, f64[5], activation,
                                        0.0)
    assert (got.double() - expected).abs().max().item() <= tol * (expected.abs().max().item() + 1.0)
    # the one-op backward computes the same
    dx, dw, db = OPS.backward(dy, x, w, b, mean, invstd, True, [True, True, True], activation, 0.0)
    torch.testing.assert_close((dx, dw, db), (got, grad_weight, grad_bias))
    # each parameter gradient where the mask asks for it, and only there
    for mask in ([True, False], [False, True], [False, False]):
        _, *grads = OPS.backward_reduce(dy, x, mean, invstd, w, b, mask, activation, 0.0)
        for wanted, got, expected in zip(mask, grads, (grad_weight, grad_bias)):
            assert got is None if not wanted else torch.equal(got, expected)
    assert OPS.backward_reduce(dy, x, mean, invstd, None, None, [True, True])[1] is None  # no weight, no gradient


def test_the_split_backward_gives_parameter_gradients_in_the_weights_dtype():
    """bfloat16 parameters (as module.to(torch.bfloat16) makes them): their gradients in bfloat16, as
    the one-op backward's; without a weight, the bias's in the statistics' float32."""
    x, w, b = (t.to(torch.bfloat16) for t in _args((4, 6, 5), torch.float32, "contiguous"))
    mean, var = OPS.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    dy = make_input((4, 6, 5), torch.bfloat16, "contiguous", seed=5)
    _, grad_weight, grad_bias = OPS.backward_reduce(dy, x, mean, invstd, w, b, [True, True])
    _, dw, db = OPS.backward(dy, x, w, b, mean, invstd, True, [False, True, True])
    assert grad_weight.dtype == grad_bias.dtype == torch.bfloat16
    assert torch.equal(grad_weight, dw) and torch.equal(grad_bias, db)
    assert OPS.backward_reduce(dy, x, mean, invstd, None, b, [False, True])[2].dtype == torch.float32


def test_the_split_backward_of_an_empty_batch_has_zero_sums_and_gradients():
    """A rank without values still takes part in the all-reduce: zeros, not 0 * invstd (NaN or not)."""
    x, w, b = _args((0, 3, 4), torch.float32, "contiguous")
    nan = torch.full((3,), float("nan"))
    sums, grad_weight, grad_bias = OPS.backward_reduce(x, x, nan, nan, w, b, [True, True])
    assert sums.shape == (2, 3) and not sums.any() and not grad_weight.any() and not grad_bias.any()
    assert OPS.backward_elemt(x, x, w, nan, nan, sums, 5, b).shape == x.shape


@pytest.mark.parametrize("sums_shape", [(6,), (3, 3), (2, 4)])
def test_backward_elemt_refuses_sums_of_another_shape(sums_shape):
    x, w, b = _args((4, 3, 5), torch.float32, "contiguous")
    mean, var = OPS.batch_stats(x)
    with pytest.raises(RuntimeError, match=r"sums should have shape \[2, 3\]"):
        OPS.backward_elemt(x, x, w, mean, var, torch.zeros(sums_shape), 20, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_backward_elemt_refuses_sums_of_another_dtype(dtype):
    x, w, b = _args((4, 3, 5), torch.float32, "contiguous")
    mean, var = OPS.batch_stats(x)
    with pytest.raises(RuntimeError, match="but backward_reduce returns them in torch.float32"):
        OPS.backward_elemt(x, x, w, mean, var, torch.zeros(2, 3, dtype=dtype), 20, b)


def test_an_empty_batch_has_undefined_statistics():
    """N = 0: no values, so every channel's mean and variance are NaN (the CUDA ops alike)."""
    x = torch.randn(0, 3, 4, 4)
    y, mean, invstd = forward_train(x)
    assert y.shape == x.shape and mean.shape == invstd.shape == (3,)
    assert mean.isnan().all() and invstd.isnan().all()
    assert all(t.shape == (3,) and t.isnan().all() for t in OPS.batch_stats(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 128, 130), (4, 8, 256, 260)], ids=["1MB", "8MB"])
def test_large_outputs_reuse_freed_blocks_and_write_every_element(shape, layout):
    """Outputs of 1 MB or more come from freed blocks of the same size (csrc/cpu/large_buffers.h):
    each op's output must land on a block just filled with NaN, and overwrite all of it."""
    x = make_input(shape, torch.float32, layout)
    dy = make_input(shape, torch.float32, layout, seed=3)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    mean, var = OPS.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    sums = OPS.backward_reduce(dy, x, mean, invstd, w, b, [False, False])[0]
    calls = {
        "forward_train": lambda: forward_train(x, w, b)[0],
        "batch_norm_eval": lambda: forward_eval(x, w, b, mean, var),
        "normalize": lambda: OPS.normalize(x, w, b, mean, invstd),
        "backward": lambda: OPS.backward(dy, x, w, b, mean, invstd, True, [True, False, False])[0],
        "backward_elemt": lambda: OPS.backward_elemt(dy, x, w, mean, invstd, sums, x.numel() // 8),
    }
    # A fresh block faults at least once per 2 MB (a huge page, where the system gives them).
    fresh_block_faults = max(1, x.nbytes // (2 << 20))
    # Python's collector, run by an allocation between the free and the call, would free an
    # earlier test's garbage (a traceback's frames hold tensors) into the cache first: the call
    # would reuse that block, as it should, and the check below would fail.
    gc.collect()
    gc.disable()
    try:
        for name, call in calls.items():
            expected = call()
            want = expected.clone(memory_format=torch.preserve_format)
            address = expected.data_ptr()
            expected.fill_(float("nan"))
            del expected
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            got = call()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
            assert got.data_ptr() == address, f"{name}: the freed block was not reused"
            # The address alone could be a new mapping that happens to land there.
            assert faults < fresh_block_faults, f"{name}: {faults} page faults writing a reused block"
            assert got.is_contiguous(memory_format=LAYOUTS[layout]), name
            assert torch.equal(got, want), f"{name}: an element kept the freed block's NaN"
    finally:
        gc.enable()


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_single_sample_batches_are_counted_by_the_update(impl):
    """update_running_stats(single_sample=True), the compiled path's and SafeSyncBatchNorm's way of
    counting a batch of one example, counts it beside the batch; the default counts none."""
    update = OPS.update_running_stats if impl == "compiled" else reference.update_running_stats
    counters, ok = torch.zeros(NUM_COUNTERS, dtype=torch.int64), torch.ones(3)
    update(None, None, None, counters, ok, ok, None, None, 8, 1e-5, 0.1)
    update(None, None, None, counters, ok, ok, None, None, 8, 1e-5, 0.1, True)
    assert counters[Counter.BATCHES] == 2 and counters[Counter.SINGLE_SAMPLE_BATCHES] == 1


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_check_running_stats_counts_what_batch_norm_eval_counts(impl):
    """The eval check alone (the compiled path's) records the same event, channel by channel, as
    batch_norm_eval's fused check, for float32 and float16 buffers."""
    check = OPS.check_running_stats if impl == "compiled" else reference.check_running_stats
    for dtype in (torch.float32, torch.float16):
        mean = torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=dtype)
        var = torch.tensor([1.0, 1.0, float("nan"), -1.0], dtype=dtype)
        weight, bias = torch.tensor([1.0, 1.0, 1.0, float("nan")]), None
        alone, fused = (torch.zeros(NUM_COUNTERS, dtype=torch.int64) for _ in range(2))
        check(alone, mean, var, weight, bias, 1e-5)
        OPS.batch_norm_eval(torch.randn(2, 4, dtype=torch.float32), weight, bias, mean.float(), var.float(), fused,
                            1e-5)
        assert alone.tolist() == fused.tolist()
        assert alone[Counter.NONFINITE_EVENTS] == 1 and alone[Counter.BAD_VAR_CHANNELS] == 2
        assert alone[Counter.BAD_MEAN_CHANNELS] == 1 and alone[Counter.BAD_WEIGHT_CHANNELS] == 1
        check(alone, torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype), None, None, 1e-5)
        assert alone[Counter.NONFINITE_EVENTS] == 1, "finite statistics are no event"
