"""The CUDA kernels against the CPU ones, which define every op's semantics:
layouts, dtypes, odd sizes (scalar fallback, unaligned views, channels split
over many blocks), empty inputs, the guard and its counters, determinism and
the absence of host synchronization. Skipped without a GPU.

SAFEBN_TEST_DEVICE=cpu runs the same comparisons CPU against CPU, which checks
the tests themselves on a machine without a GPU."""
from __future__ import annotations

import copy
import gc
import os
import threading

import pytest
import torch

import torch_safebn
from conftest import forward_eval, forward_train
from torch_safebn.contract import NUM_COUNTERS, Counter

OPS = torch.ops.safebn
DEVICE = os.environ.get("SAFEBN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not (torch.cuda.is_available() and torch_safebn.backend() == "cuda+cpu"),
    reason="needs a CUDA GPU and the extension built with CUDA",
)

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d}
# (shape, layout): 16-byte packs and the scalar fallback (S or C not a multiple
# of the pack), N = 1 (runs split across blocks), small C with large planes
# (channels split over many blocks), C = 3 channels-last, 2-D and 3-D inputs.
CASES = [
    ((4, 6, 5, 7), "contiguous"),
    ((4, 6, 8, 8), "contiguous"),
    ((4, 6, 8, 8), "channels_last"),
    ((4, 16, 5, 7), "channels_last"),
    ((20, 6, 64, 64), "contiguous"),
    ((1, 3, 97, 131), "contiguous"),
    ((8, 3, 32, 32), "channels_last"),
    ((64, 40), "contiguous"),
    ((5, 3), "contiguous"),
    ((3, 4, 33), "contiguous"),
    ((2, 8, 3, 4, 5), "channels_last_3d"),
    ((4096, 2, 1, 1), "contiguous"),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (atol, rtol) of CUDA against CPU: summation order for float32/float64; one
# rounding of a half-precision output either way.
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (5e-5, 2e-5),
             torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, layout, seed, offset=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).contiguous(memory_format=LAYOUTS[layout])


def on_device(t):
    """t on the device under test, after filling freed device memory with NaN,
    so that an output element no kernel writes shows up as NaN."""
    if t is None:
        return None
    if DEVICE == "cuda":
        torch.empty(1 << 24, device=DEVICE).fill_(float("nan"))
    return t.to(DEVICE)


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCE[dtype]
    assert actual.device.type == DEVICE, what
    torch.testing.assert_close(actual.cpu().double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def params(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    return (torch.rand(C, generator=g, dtype=acc) + 0.5), torch.randn(C, generator=g, dtype=acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
def test_every_op_matches_cpu(shape, layout, dtype):
    x, dy = make(shape, dtype, layout, seed=0), make(shape, dtype, layout, seed=2, offset=0.0)
    C, eps = shape[1], 1e-5
    w, b = params(C, dtype)
    dx, ddy, dw, db = on_device(x), on_device(dy), on_device(w), on_device(b)

    y, mean, invstd = forward_train(x, w, b, eps)
    y_d, mean_d, invstd_d = forward_train(dx, dw, db, eps)
    assert y_d.stride() == y.stride(), "the output keeps the input's layout"
    assert_close(y_d, y, dtype, "forward_train output")
    assert_close(mean_d, mean, torch.float64 if dtype == torch.float64 else torch.float32, "mean")
    assert_close(invstd_d, invstd, torch.float64 if dtype == torch.float64 else torch.float32, "invstd")
    assert_close(forward_train(dx, eps=eps)[0], forward_train(x, eps=eps)[0], dtype, "forward_train without affine")

    m, v = OPS.batch_stats(x)
    m_d, v_d = OPS.batch_stats(dx)
    assert_close(m_d, m, acc_dtype(dtype), "batch_stats mean")
    assert_close(v_d, v, acc_dtype(dtype), "batch_stats var")
    assert_close(OPS.normalize(dx, dw, db, on_device(mean), on_device(invstd)),
                 OPS.normalize(x, w, b, mean, invstd), dtype, "normalize")
    assert_close(forward_eval(dx, dw, None, on_device(m), on_device(v), eps),
                 forward_eval(x, w, None, m, v, eps), dtype, "batch_norm_eval")

    for train in (True, False):
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            expected = OPS.backward(dy, x, w, None, mean, invstd, train, mask)
            actual = OPS.backward(ddy, dx, dw, None, on_device(mean), on_device(invstd), train, mask)
            for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), actual, expected):
                assert (a is None) == (e is None), name
                if e is not None:
                    # parameter gradients are sums over N * S: compare relative to their scale
                    scale = 1.0 if name == "grad_input" else max(1.0, e.abs().max().item())
                    assert_close(a / scale, e / scale, dtype if name == "grad_input" else acc_dtype(dtype),
                                 f"backward {name} train={train} mask={mask}")
    assert OPS.backward(ddy, dx, None, None, on_device(mean), on_device(invstd), True, [True, True, True])[1] is None

    for mask in ([True, True], [False, False]):
        reduced = OPS.backward_reduce(dy, x, mean, invstd, w, None, mask)
        reduced_d = OPS.backward_reduce(ddy, dx, on_device(mean), on_device(invstd), dw, None, mask)
        for name, a, e in zip(("sums", "grad_weight", "grad_bias"), reduced_d, reduced):
            assert (a is None) == (e is None), name
            if e is not None:
                scale = max(1.0, e.abs().max().item())
                assert_close(a / scale, e / scale, acc_dtype(dtype), f"backward_reduce {name} mask={mask}")
    sums = reduced[0]
    count = x.numel() // C
    assert_close(OPS.backward_elemt(ddy, dx, dw, on_device(mean), on_device(invstd), on_device(sums), count),
                 OPS.backward_elemt(dy, x, w, mean, invstd, sums, count), dtype, "backward_elemt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unaligned_views_take_the_scalar_path(dtype):
    """A view one element into its storage cannot be read in 16-byte packs."""
    base = make((4 * 6 * 8 * 8 + 1,), dtype, "contiguous", seed=3)
    x = base[1:].view(4, 6, 8, 8)
    y, mean, invstd = forward_train(x)
    y_d, mean_d, invstd_d = forward_train(on_device(base)[1:].view(4, 6, 8, 8))
    assert_close(y_d, y, dtype, "output")
    assert_close(mean_d, mean, torch.float32, "mean")


@pytest.mark.parametrize("shape,layout", [((64, 2, 128, 128), "contiguous"), ((64, 2, 128, 128), "channels_last"),
                                          ((1_000_000, 2), "contiguous"), ((1, 2, 1024, 1024), "contiguous")])
def test_large_offset_statistics_in_float32(shape, layout):
    """1e4 + N(0, 1) in float32: variance within 1e-4 relative of float64, mean to float32's spacing."""
    x64 = make(shape, torch.float64, layout, seed=4, offset=1e4, scale=1.0)
    var64, mean64 = torch.var_mean(x64, dim=[d for d in range(x64.dim()) if d != 1], correction=0)
    mean, var = OPS.batch_stats(on_device(x64.float()))
    torch.testing.assert_close(var.cpu().double(), var64, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.cpu().double(), mean64, rtol=1e-7, atol=0)


def test_empty_inputs_match_cpu():
    x = torch.empty(0, 3, 4, 4)
    y_d, mean_d, invstd_d = forward_train(on_device(x))
    assert y_d.shape == x.shape and mean_d.isnan().all() and invstd_d.isnan().all()
    w, invstd = torch.ones(3), torch.full((3,), float("nan"))
    expected = OPS.backward(x, x, w, None, torch.zeros(3), invstd, True, [True, True, True])
    actual = OPS.backward(on_device(x), on_device(x), on_device(w), None, on_device(torch.zeros(3)), on_device(invstd),
                          True, [True, True, True])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, equal_nan=True)


def _update_sequence(device, buffer_dtype):
    """The guard's decisions over a sequence of batches: clean, cumulative
    (momentum=None), non-finite mean or bias, too few values, low variance,
    and an update that would overflow float16 buffers."""
    t = lambda *v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    rm = torch.zeros(3, dtype=buffer_dtype, device=device)
    rv = torch.ones(3, dtype=buffer_dtype, device=device)
    nbt = torch.tensor(4, device=device)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)
    mean, invstd = t(1.0, 2.0, 3.0), torch.rsqrt(t(4.0, 1.0, 0.25) + 1e-5)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, None, None, 5, 1e-5, None)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, t(1.0, 1.0, 1.0), t(0.0, float("nan"), 0.0),
                             5, 1e-5, 0.1)
    OPS.update_running_stats(rm, rv, nbt, counters, t(float("inf"), 0.0, 0.0), invstd, None, None, 5, 1e-5, 0.1)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, None, None, 1, 1e-5, 0.1)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, t(1e5, 1e5, 1.0), None, None, 8, 1e-5, 0.1)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, t(1e-4, 1e-4, 1e-4), None, None, 5, 1e-5, 0.5)
    OPS.update_running_stats(rm, rv, None, None, mean, invstd, None, None, 6, 1e-5, 0.2)  # unguarded
    OPS.update_running_stats(None, None, None, counters, mean, invstd, None, None, 6, 1e-5, 0.2)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, None, None, 6, 1e-5, 0.2, True)  # one example
    return rm.cpu(), rv.cpu(), nbt.cpu(), counters.cpu()


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_update_running_stats_matches_cpu(buffer_dtype):
    expected = _update_sequence("cpu", buffer_dtype)
    actual = _update_sequence(DEVICE, buffer_dtype)
    # float32 arithmetic either way; a float16 buffer may round one ulp apart
    rtol = 1e-3 if buffer_dtype == torch.float16 else 1e-6
    for name, a, e in zip(("running_mean", "running_var", "num_batches_tracked", "counters"), actual, expected):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=rtol, atol=0, msg=lambda m: f"{name}: {m}")


def _training_sequence(device, buffer_dtype):
    """forward_train's guard over a sequence of batches (clean, non-finite, one example,
    overflowing float16 buffers, empty), as a module calls it."""
    rm = torch.zeros(3, dtype=buffer_dtype, device=device)
    rv = torch.ones(3, dtype=buffer_dtype, device=device)
    nbt = torch.tensor(0, device=device)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)
    dtype = torch.float16 if buffer_dtype == torch.float16 else torch.float32
    batches = [make((4, 3, 5), dtype, "contiguous", seed=s) for s in range(3)]
    batches[1][0, 2, 0] = float("nan")
    batches.append(make((1, 3, 7), dtype, "contiguous", seed=3))  # one example
    batches.append((make((4, 3, 5), torch.float32, "contiguous", seed=4) * 2e4).to(dtype))  # var overflows float16
    batches.append(torch.empty(0, 3, 5, dtype=dtype))
    for momentum, x in zip((None, 0.1, 0.1, 0.2, 0.5, 0.1), batches):
        OPS.forward_train(x.to(device), None, None, rm, rv, nbt, counters, momentum, 1e-5)
    return rm.cpu(), rv.cpu(), nbt.cpu(), counters.cpu()


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16], ids=str)
def test_forward_train_guard_matches_cpu(buffer_dtype):
    expected = _training_sequence("cpu", buffer_dtype)
    actual = _training_sequence(DEVICE, buffer_dtype)
    rtol = 1e-3 if buffer_dtype == torch.float16 else 1e-6
    for name, a, e in zip(("running_mean", "running_var", "num_batches_tracked", "counters"), actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=0, msg=lambda m: f"{name}: {m}")
    assert expected[3][Counter.SINGLE_SAMPLE_BATCHES] == 1 and expected[3][Counter.NONFINITE_EVENTS] >= 1


def test_eval_check_matches_cpu():
    def run(device):
        counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)
        one = torch.ones(4, device=device)
        x = torch.ones(3, 4, device=device)
        OPS.batch_norm_eval(x, one, one, one, one, counters, 1e-5)
        bad_var = torch.tensor([1.0, -1.0, float("nan"), 1.0], device=device)
        bad_bias = torch.tensor([0, float("inf"), 0, 0], device=device)
        OPS.batch_norm_eval(x, None, bad_bias, one, bad_var, counters, 1e-5)
        OPS.batch_norm_eval(x, None, None, one, bad_var, counters, 1e-5)
        OPS.check_running_stats(counters, one, bad_var, one, bad_bias, 1e-5)  # the compiled path's check
        return counters.cpu()

    actual, expected = run(DEVICE), run("cpu")
    assert torch.equal(actual, expected), (actual, expected)
    # Three events, none reported: the channel slots describe the first.
    assert actual[Counter.NONFINITE_EVENTS] == 3 and actual[Counter.BAD_VAR_CHANNELS] == 2
    assert actual[Counter.BAD_BIAS_CHANNELS] == 1 and actual[Counter.EVENT_IN_TRAINING] == 0


@pytest.mark.parametrize("shape,layout", [((20, 6, 64, 64), "contiguous"), ((16, 64, 16, 16), "channels_last")])
def test_results_are_deterministic(shape, layout):
    x = on_device(make(shape, torch.float32, layout, seed=5))
    dy = on_device(make(shape, torch.float32, layout, seed=6))
    first = forward_train(x)
    grads = OPS.backward(dy, x, None, None, first[1], first[2], True, [True, False, False])
    again = forward_train(x)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(grads[0], OPS.backward(dy, x, None, None, first[1], first[2], True, [True, False, False])[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronization is a CUDA matter")
def test_no_op_synchronizes_with_the_host():
    x = on_device(make((8, 16, 12, 12), torch.float32, "channels_last", seed=7))
    w, b = map(on_device, params(16, torch.float32))
    rm, rv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    nbt, counters = torch.tensor(0, device=DEVICE), torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, mean, invstd = OPS.forward_train(x, w, b, rm, rv, nbt, counters, None, 1e-5)
        OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, w, b, 8 * 144, 1e-5, None)
        OPS.backward(y, x, w, b, mean, invstd, True, [True, True, True])
        OPS.batch_norm_eval(x, w, b, rm, rv, counters, 1e-5)
        bn = torch_safebn.SafeBatchNorm2d(16, device=DEVICE)
        bn(x).sum().backward()
        bn.eval()(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert nbt.item() == 2 and counters[Counter.BATCHES].item() == 2


@pytest.mark.parametrize("shape,dtype,layout", [((4, 6, 5, 3), torch.float32, "contiguous"),
                                                ((4, 6, 5, 3), torch.float32, "channels_last"),
                                                ((8, 5), torch.float64, "contiguous"),
                                                ((2, 3, 2, 3, 4), torch.float16, "channels_last_3d")])
def test_opcheck_every_op(shape, dtype, layout):
    x = on_device(make(shape, dtype, layout, seed=8))
    grad = on_device(make(shape, dtype, layout, seed=9))
    w, b = map(on_device, params(shape[1], dtype))
    eps, count = 1e-5, x.numel() // shape[1]
    mean, var = OPS.batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    sums = OPS.backward_reduce(grad, x, mean, invstd, w, b, [False, False])[0]
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=x.device)
    buffers = (torch.zeros_like(mean), torch.ones_like(mean), torch.tensor(0, device=x.device), counters)
    calls = [
        (OPS.forward_train.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(),
                                        *[t.clone() for t in buffers], 0.1, eps)),
        (OPS.batch_norm_eval.default, (x, w, b, mean, var, counters.clone(), eps)),
        (OPS.backward.default, (grad, x.detach(), w.detach(), b.detach(), mean, invstd, True, [True, True, True])),
        (OPS.batch_stats.default, (x.detach(),)),
        (OPS.normalize.default, (x.detach(), w.detach(), b.detach(), mean, invstd)),
        (OPS.backward_reduce.default, (grad, x.detach(), mean, invstd, w.detach(), b.detach(), [True, True])),
        (OPS.backward_elemt.default, (grad, x.detach(), w.detach(), mean, invstd, sums, count)),
        (OPS.update_running_stats.default, (*[t.clone() for t in buffers], mean, invstd,
                                            w.detach(), b.detach(), count, eps, None)),
        (OPS.check_running_stats.default, (counters.clone(), mean, var, w.detach(), b.detach(), eps)),
        (OPS.check_running_stats.default, (counters.clone(), mean, torch.full_like(var, float("nan")), None, None,
                                           eps)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


def _device_work(call) -> tuple[int, int]:
    """(kernels, copies and fills) that `call` puts on the GPU, from torch.profiler."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        torch.cuda.synchronize()
    names = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for n in names if n.startswith(("Memcpy", "Memset")))
    return len(names) - copies, copies


@pytest.mark.skipif(DEVICE != "cuda", reason="kernel launches are a CUDA matter")
@pytest.mark.parametrize("shape,layout", [((8, 16, 12, 12), "contiguous"), ((8, 16, 12, 12), "channels_last"),
                                          ((2, 4, 256, 256), "contiguous"), ((512, 64), "contiguous")])
def test_launches_per_call(shape, layout):
    """With float32 parameters: a training forward is two kernels (the statistics with the
    guarded update, then the normalization), the backward two, eval one; the one copy is the
    counters' snapshot for the lagged raise, and nothing is filled per call."""
    module = torch_safebn.SafeBatchNorm2d if len(shape) == 4 else torch_safebn.SafeBatchNorm1d
    bn = module(shape[1], device=DEVICE)
    x = make(shape, torch.float32, layout, seed=10).to(DEVICE).requires_grad_()
    bn(x).sum().backward()  # caches: occupancy, arrival counters, snapshot buffer
    bn.zero_grad(set_to_none=True)  # else the profiled backward also accumulates into the warm-up's gradients
    x.grad = None
    outputs = []
    assert _device_work(lambda: outputs.append(bn(x))) == (2, 1)
    grad = torch.ones_like(outputs[0])
    assert _device_work(lambda: outputs[0].backward(grad)) == (2, 0)
    bn.eval()
    with torch.no_grad():
        assert _device_work(lambda: bn(x)) == (1, 1)


# -- execution contexts: CUDA graphs, host threads, the counters' snapshot ----------------------
def _module_twins(C, dtype=torch.float32, momentum=0.1):
    """A SafeBatchNorm2d on the device under test and its CPU twin."""
    cpu = torch_safebn.SafeBatchNorm2d(C, momentum=momentum, on_nonfinite="skip")
    return copy.deepcopy(cpu).to(DEVICE), cpu


def _assert_same_state(device_module, cpu_module, what):
    for (name, a), (_, b) in zip(device_module.named_buffers(), cpu_module.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5, msg=f"{what}: {name}")
        else:
            assert torch.equal(a.cpu(), b), f"{what}: {name} {a.cpu().tolist()} != {b.tolist()}"


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_graphs_replayed_alternately_and_concurrently_match_eager_cpu():
    """Two graphs of different shapes, one with more tiles than an eager set holds at first
    (C = 2048 channels, contiguous), captured one after the other and replayed alternately, then
    concurrently on two streams, 200 times: each keeps its own arrival counters."""
    cases = [((8, 16, 10, 10), "channels_last"), ((2, 2048, 8, 8), "contiguous")]
    twins = [_module_twins(shape[1]) for shape, _ in cases]
    inputs = [make(shape, torch.float32, layout, seed=20 + i) for i, (shape, layout) in enumerate(cases)]
    static = [x.to(DEVICE) for x in inputs]
    graphs, outputs = [], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph expects
        for (module, _), x in zip(twins, static):
            module(x)
    torch.cuda.current_stream().wait_stream(side)
    for (module, cpu), x, x_cpu in zip(twins, static, inputs):
        cpu(x_cpu)  # the warm-up's update
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(module(x))
        graphs.append(graph)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for step in range(200):
        if step < 100:
            for graph in graphs:
                graph.replay()
        else:
            for graph, stream in zip(graphs, streams):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    graph.replay()
            for stream in streams:
                torch.cuda.current_stream().wait_stream(stream)
        expected = [cpu(x_cpu) for (_, cpu), x_cpu in zip(twins, inputs)]
    torch.cuda.synchronize()
    for (module, cpu), output, want in zip(twins, outputs, expected):
        _assert_same_state(module, cpu, "after 200 replays")
        torch.testing.assert_close(output.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="host threads on one CUDA stream")
def test_two_host_threads_on_one_stream_while_the_counters_grow():
    """One thread loops over C = 64 while the other makes the first C = 4096 call (which grows the
    stream's arrival counters): every result equals the CPU's."""
    errors = []

    def loop(C, calls, seed):
        try:
            x = make((4, C, 16, 16), torch.float32, "contiguous", seed=seed)
            expected = forward_train(x)
            x_d = x.to(DEVICE)
            for _ in range(calls):
                got = forward_train(x_d)
                for a, b in zip(got, expected):
                    torch.testing.assert_close(a.cpu(), b, atol=5e-5, rtol=2e-5)
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=loop, args=(64, 300, 30)), threading.Thread(target=loop, args=(4096, 3, 31))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA counters' snapshot")
def test_a_freed_module_with_a_snapshot_in_flight_keeps_its_pinned_buffer():
    """The snapshot's pinned buffer is recorded as in use on its stream: freed while the copy
    waits behind a long kernel, it is not handed to the next pinned tensor of its size."""
    bn = torch_safebn.SafeBatchNorm2d(4, device=DEVICE)
    x = torch.randn(8, 4, 6, 6, device=DEVICE)
    bn(x)  # makes the snapshot buffer
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the next copy waits behind this
    bn(x)
    address = bn.safety_state._snapshot[1].data_ptr()
    del bn
    gc.collect()
    other = torch.empty(NUM_COUNTERS, dtype=torch.int64, pin_memory=True)
    assert other.data_ptr() != address
    torch.cuda.synchronize()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_guard_after_a_multi_block_merge_matches_cpu(layout, dtype, momentum):
    """[32, 64, 56, 56] splits every channel over many blocks, whose last arrival merges the
    partial totals and runs the guard: a NaN in one channel only skips the update on every
    device alike, every buffer and counter equal to the CPU's."""
    device_module, cpu = _module_twins(64, momentum=momentum)
    if dtype in (torch.float16, torch.bfloat16):
        device_module, cpu = device_module.float(), cpu.float()
    else:
        device_module, cpu = device_module.to(dtype), cpu.to(dtype)
    for step in range(3):
        x = make((32, 64, 56, 56), dtype, layout, seed=40 + step)
        if step == 1:
            x[5, 17, 3, 4] = float("nan")
        cpu(x)
        device_module(x.to(DEVICE))
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        _assert_same_state(device_module, cpu, f"step {step}")


def test_500_calls_alternating_shapes_dtypes_and_layouts_on_one_stream():
    g = torch.Generator().manual_seed(50)
    for call in range(500):
        shape, layout = CASES[int(torch.randint(len(CASES), (1,), generator=g))]
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=g))]
        x = make(shape, dtype, layout, seed=call)
        expected = forward_train(x)
        got = forward_train(x.to(DEVICE))
        for a, b, kind in zip(got, expected, (dtype, acc_dtype(dtype), acc_dtype(dtype))):
            assert_close(a, b, kind, f"call {call}: {shape} {layout} {dtype}")


def test_results_are_deterministic_over_500_calls():
    x = on_device(make((20, 6, 64, 64), torch.float32, "contiguous", seed=5))
    first = forward_train(x)
    for _ in range(500):
        assert all(torch.equal(a, b) for a, b in zip(first, forward_train(x)))


def test_empty_eval_and_channelless_training_count_as_on_cpu():
    """The guard's one home: an empty eval batch still checks the running statistics, and a
    training batch without channels (no counters) advances num_batches_tracked, on every device."""
    def run(device):
        counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)
        nan = torch.full((3,), float("nan"), device=device)
        OPS.batch_norm_eval(torch.empty(0, 3, 2, 2, device=device), None, None, nan, nan, counters, 1e-5)
        empty = torch.empty(0, device=device)
        nbt = torch.tensor(0, device=device)
        OPS.forward_train(torch.empty(4, 0, 2, 2, device=device), None, None, empty, empty, nbt, None, 0.1, 1e-5)
        return counters.cpu(), nbt.cpu()

    (counters, nbt), (expected_counters, expected_nbt) = run(DEVICE), run("cpu")
    assert torch.equal(counters, expected_counters) and counters[Counter.NONFINITE_EVENTS] == 1
    assert torch.equal(nbt, expected_nbt) and nbt.item() == 1
