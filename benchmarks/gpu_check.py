"""One run on a GPU machine that answers what a CPU-only machine cannot: are the
CUDA kernels right, do they stay off the host, and how fast are they.

    python benchmarks/gpu_check.py [--device cuda] [--budget-s 240] [--quick] [--out DIR]

It assumes the extension is built (benchmarks/gpu_check.sh builds it, then runs
this, then tests/test_cuda.py) and rebuilds nothing. In order:

  (a) correctness  SafeBatchNorm1d/2d/3d (convert_model over nn.BatchNorm1d/2d/3d)
                   against nn.BatchNorm and against a float64 reference (the native
                   module in float64 on the same values): output, running statistics,
                   num_batches_tracked, grad_input, grad_weight, grad_bias, over
                   shapes x layouts x dtypes x train/eval x affine on/off. Then every
                   op on its own against reference.py in float64, its outputs
                   allocated from memory just filled with NaN, so that an element no
                   kernel writes shows up.
  (b) selfcheck    torch_safebn.tools.selfcheck on the device: parity, gradcheck and
                   gradgradcheck in float64, torch.library.opcheck on every op.
  (c) host sync    a conv-bn-relu training step captured in a CUDA graph and replayed
                   matches eager; a NaN injected into the captured input leaves the
                   running buffers alone and is counted; and an eager step under
                   torch.cuda.set_sync_debug_mode makes no synchronizing call.
                   CUDA only: skipped on the CPU, with a line that says so.
  (d) timings      torch_safebn.tools.layer_bench's measure() against native (cuDNN),
                   native-nocudnn and torch.compile, in priority order, as far as
                   --budget-s allows (see TIMING below).
  (e) the table    printed last; JSON under --out (default $OUT, else ./gpu_check_out):
                   gpu_check.json (everything, rewritten after every section) and
                   timings-DEVICE.json (the engine's format).

Tolerances, as the largest error relative to the reference tensor's largest
magnitude, max|got - want| / max|want|, by the dtype the tensor is stored in
(see TOLERANCE): float32 1e-5 for outputs and statistics and 1e-4 for gradients;
float64 1e-10; float16 and bfloat16 their machine epsilon (2**-10, 2**-7), twice
what one rounding to nearest can be off by. Against nn.BatchNorm, whose result carries
its own error, twice those. Where the parameters are bfloat16, the native peer
runs with float32 parameters (DESIGN.md, Numerics).

The exit status is 1 when any correctness check fails (a safebn implementation
failing to time counts too), with the table and the JSON written all the same;
2 when the device cannot run the checks at all, with only the JSON saying why.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

import torch_safebn
from torch_safebn import reference
from torch_safebn.contract import Counter
from torch_safebn.tools import layer_bench, selfcheck
from torch_safebn.tools.layer_table import format_compact_table
from torch_safebn.tools.machine import device_name, torch_threads

OPS = torch.ops.safebn
FORMAT = "torch_safebn.gpu_check/1"
EPS = 1e-5

# -- what is checked -------------------------------------------------------------------------
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
# (input dtype, parameter dtype): mixed precision as autocast leaves it, bfloat16
# throughout, and float64.
DTYPES = ((F32, F32), (F16, F32), (BF16, F32), (BF16, BF16), (F64, F64))
# (shape, layout): odd sizes on purpose.
CASES = (
    ((8, 16), "contiguous"),  # BatchNorm1d over [N, C]
    ((4, 6, 33), "contiguous"),  # BatchNorm1d over [N, C, L], L odd
    ((4, 1, 7, 7), "contiguous"),  # C = 1
    ((1, 8, 13, 11), "contiguous"),  # N = 1 with planes of 143: no vector width divides them
    ((1, 8, 13, 11), "channels_last"),
    ((6, 10, 7, 7), "contiguous"),
    ((6, 10, 7, 7), "channels_last"),
    ((3, 5, 13, 11), "channels_last"),  # C odd in channels-last rows
    ((2, 3, 4, 5, 6), "contiguous"),
    ((2, 3, 4, 5, 6), "channels_last_3d"),
    ((4, 2048, 7, 7), "contiguous"),  # large C
    ((4, 2048, 7, 7), "channels_last"),
    ((20, 6, 256, 256), "contiguous"),  # few channels, huge planes
    ((20, 6, 256, 256), "channels_last"),
    ((65536, 1024), "contiguous"),  # 2-D, many rows
)
QUICK_CASES = CASES[:7] + CASES[9:10]
# (shape, layout, dtype) of the opcheck arguments; the selfcheck's own first.
OP_CASES = (
    *selfcheck.OP_CASES,
    ((4, 6, 5, 3), "channels_last", F32),
    ((2, 3, 2, 3, 4), "channels_last_3d", F16),
    ((3, 4, 7), "contiguous", BF16),
    ((8, 5), "contiguous", F64),
)
# Largest error relative to the reference's largest magnitude, by stored dtype:
# (outputs and statistics, gradients and the backward's sums).
TOLERANCE = {
    F64: (1e-10, 1e-10),
    F32: (1e-5, 1e-4),
    F16: (torch.finfo(F16).eps, torch.finfo(F16).eps),
    BF16: (torch.finfo(BF16).eps, torch.finfo(BF16).eps),
}
NATIVE_SLACK = 2  # nn.BatchNorm's result has its own error: against it, twice the tolerance

NATIVE_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# -- timing ------------------------------------------------------------------------------------
# TIMING: every shape in both layouts (4-D) and every dtype for the training
# forward + backward; the other passes for a subset. A compile costs seconds and
# the other implementations about one together, so torch.compile is timed apart,
# later. Steps are measured in this order while the budget lasts:
#   1. fwdbwd, DESIGN.md's reference points first: safebn, safebn-nochecks,
#      native, native-nocudnn
#   2. torch.compile on the reference points
#   3. fwd, bwd and eval on the subset, as in 1
#   4. torch.compile on the rest of 1, then on 3.
# A step is started only when its estimated cost fits in what is left (Budget).
TIMING_SHAPES = ((256, 256, 56, 56), (128, 64, 112, 112), (256, 2048, 7, 7), (32, 64, 56, 56),
                 (20, 6, 256, 256), (65536, 1024))
TIMING_DTYPES = ((F32, F32), (BF16, F32), (BF16, BF16), (F16, F32))
SUBSET_SHAPES = ((256, 256, 56, 56), (20, 6, 256, 256), (65536, 1024))
SUBSET_DTYPES = ((F32, F32), (BF16, F32))
OTHER_PASSES = ("fwd", "bwd", "eval")
# DESIGN.md's performance reference points (native, measured on an H200).
REFERENCE_POINTS = (
    ((256, 256, 56, 56), "contiguous", BF16),
    ((128, 64, 112, 112), "contiguous", BF16),
    ((20, 6, 256, 256), "contiguous", F32),
    ((256, 256, 56, 56), "channels_last", F32),
)
QUICK_TIMING_SHAPES = ((8, 16, 14, 14), (512, 64))
# Each implementation of a step gets min_run_time of timed calls, in blocks taken
# in turns with the others' (timing.time_in_turns). 0.02 s is 10 calls or
# more of every case here on a GPU, and leaves time for torch.compile.
MIN_RUN_TIME_S = {"cuda": 0.02, "cpu": 0.01}
# Seconds a step is assumed to take until one of its kind has been timed: the
# first compile starts inductor and its workers.
PRIOR_COST_S = {"core": 3.0, "compile": 30.0}
FINISH_RESERVE_S = 5.0  # for the table and the JSON
GIVE_UP_AFTER_ERRORS = 2  # a kind of step failing this often in a row is not tried again (say, inductor cannot compile)


# -- progress ------------------------------------------------------------------------------
class Clock:
    """Seconds since the start, and what is left of the budget."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


CLOCK = Clock(float("inf"))


def log(message: str = "") -> None:
    print(f"[{CLOCK.elapsed():6.1f}s] {message}" if message else "", flush=True)


def section(title: str) -> None:
    print(flush=True)
    log(f"== {title}")


def dtype_label(dtype: torch.dtype, param_dtype: torch.dtype) -> str:
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return layer_bench.dtype_label(name(dtype), name(param_dtype))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- comparisons -----------------------------------------------------------------------------
def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| in float64 (nan when got holds NaN)."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got - want).abs().max() / scale).item()


def tolerance(t: torch.Tensor, gradient: bool) -> float:
    return TOLERANCE[t.dtype][1 if gradient else 0]


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, gradient: bool, slack: float = 1.0,
                allowance: float = 0.0) -> float:
    """The relative error; raises AssertionError past slack x the tolerance plus
    `allowance` (NaN included)."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    error, limit = relative_error(got, want), slack * tolerance(got, gradient) + allowance
    if not error <= limit:
        raise AssertionError(f"{what}: relative error {error:.3g} > {limit:.3g} ({got.dtype})")
    return error


def check_layout(what: str, t: torch.Tensor, shape, layout: str) -> None:
    if not t.is_contiguous(memory_format=selfcheck.memory_format(shape, layout)):
        raise AssertionError(f"{what} is not {layout} like the input: strides {t.stride()}")


# -- (a) modules against nn.BatchNorm and float64 ------------------------------------------------
def _training_step(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor, training: bool) -> dict:
    """Forward (training or eval), backward, and the state the module ends with."""
    module.train(training)
    x = x.detach().clone().requires_grad_()
    params = [p for p in (module.weight, module.bias) if p is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N = 1: the single-sample warning
        output = module(x)
        grads = torch.autograd.grad(output, [x, *params], grad_output)
    result = {"output": output, "grad_input": grads[0]}
    if params:
        result["grad_weight"], result["grad_bias"] = grads[1:]
    result.update(running_mean=module.running_mean, running_var=module.running_var,
                  num_batches_tracked=module.num_batches_tracked)
    return result


def module_check(device, shape, layout, dtype, param_dtype, training: bool, affine: bool, seed: int) -> dict:
    """SafeBatchNorm against nn.BatchNorm (float32 parameters where they are
    bfloat16) and against nn.BatchNorm in float64; returns the relative errors."""
    generator = torch.Generator(device).manual_seed(seed)
    x, weight, bias, grad_output = selfcheck.sample(shape, layout, dtype, device, generator, param_dtype)
    channels = shape[1]
    native = NATIVE_CLASS[len(shape)](channels, affine=affine, device=device, dtype=param_dtype)
    with torch.no_grad():
        if affine:
            native.weight.copy_(weight)
            native.bias.copy_(bias)
        native.running_mean.copy_(torch.randn(channels, generator=generator, device=device) * 0.5)
        native.running_var.copy_(torch.rand(channels, generator=generator, device=device) + 0.5)
        native.num_batches_tracked.fill_(3)
    safe = torch_safebn.convert_model(copy.deepcopy(native))
    peer = copy.deepcopy(native).float() if param_dtype in (F16, BF16) else native
    float64 = copy.deepcopy(native).double()

    got = _training_step(safe, x, grad_output, training)
    want = _training_step(float64, x.double(), grad_output.double(), training)
    native_result = _training_step(peer, x, grad_output, training)
    if set(got) != set(want):
        raise AssertionError(f"results {sorted(got)}, expected {sorted(want)}")
    if not torch.equal(got["num_batches_tracked"], want["num_batches_tracked"]):
        raise AssertionError(f"num_batches_tracked {got['num_batches_tracked'].item()}, "
                             f"expected {want['num_batches_tracked'].item()}")
    for name in ("output", "grad_input"):
        check_layout(name, got[name], shape, layout)
    errors = {}
    for name in want:
        if name == "num_batches_tracked":
            continue
        expected_dtype = dtype if name in ("output", "grad_input") else param_dtype
        if got[name].dtype != expected_dtype:
            raise AssertionError(f"{name} is {got[name].dtype}, expected {expected_dtype}")
        gradient = name.startswith("grad")
        # nn.BatchNorm is off the float64 result by its own error too (cuDNN sums
        # half-precision gradients in half precision): against it, that error is allowed on top.
        native_error = relative_error(native_result[name], want[name])
        errors[name] = {
            "vs_float64": check_close(f"{name} against float64", got[name], want[name], gradient),
            "vs_native": check_close(f"{name} against nn.BatchNorm", got[name], native_result[name], gradient,
                                     slack=NATIVE_SLACK, allowance=native_error),
            "native_vs_float64": native_error,
        }
    return {"dtypes": dtype_label(dtype, param_dtype), "errors": errors}


# -- (a) each op on NaN-filled memory ----------------------------------------------------------------
POISON = 0xFF  # every byte 0xFF is NaN in float16, bfloat16, float32 and float64
SMALL_SEGMENT = 2 << 20  # the caching allocator carves allocations of 1 MiB or less from 2 MiB segments


@dataclasses.dataclass
class Poison:
    """The address ranges that held NaN when the allocations under test began
    (none off CUDA, where freed memory is not cached)."""

    ranges: list[tuple[int, int]]

    def covers(self, t: torch.Tensor) -> bool:
        start = t.data_ptr()
        end = start + t.untyped_storage().nbytes()
        return any(low <= start and end <= high for low, high in self.ranges)


def _private_pool():
    try:
        return torch.cuda.MemPool() if hasattr(torch.cuda, "use_mem_pool") else None
    except RuntimeError:  # e.g. an allocator backend without pools
        return None


@contextlib.contextmanager
def poisoned_allocations(device: torch.device, nbytes: int) -> Iterator[Poison]:
    """Allocations inside come from memory just filled with NaN: a fresh
    memory pool (torch.cuda.MemPool) whose only free blocks are a freed large
    block of nbytes and a freed small segment, both filled with NaN; check
    the outputs inside the block and drop them there. Where MemPool is
    missing, the default pool after empty_cache(), with less certainty:
    Poison.covers() tells which outputs did land on poisoned memory either way."""
    if device.type != "cuda":
        yield Poison([])
        return
    pool = _private_pool()
    with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
        if pool is None:
            torch.cuda.empty_cache()
        # Two halves of one small segment, and one large block (over 1 MiB: the large pool).
        blocks = [torch.empty(SMALL_SEGMENT // 2, dtype=torch.uint8, device=device) for _ in range(2)]
        blocks.append(torch.empty(max(nbytes, 4 << 20), dtype=torch.uint8, device=device))
        for block in blocks:
            block.fill_(POISON)
        ranges = sorted((b.data_ptr(), b.data_ptr() + b.numel()) for b in blocks)
        merged = [list(ranges[0])]
        for low, high in ranges[1:]:
            if low == merged[-1][1]:
                merged[-1][1] = high
            else:
                merged.append([low, high])
        del blocks
        yield Poison([tuple(r) for r in merged])


def _op_calls(x, weight, bias, grad_output, mean, invstd, running_mean, running_var):
    """(label, call, reference call, which outputs are gradients) for every op
    that returns tensors; the reference is reference.py in float64."""
    count = x.numel() // x.shape[1]
    sums = OPS.backward_reduce(grad_output, x, mean, invstd, weight, bias, [False, False])[0]
    f64 = lambda *ts: [t.double() if isinstance(t, torch.Tensor) else t for t in ts]  # noqa: E731
    all_grads = [True, True, True]
    no_buffers = (None, None, None, None, 0.1)
    return [
        ("forward_train", lambda: OPS.forward_train(x, weight, bias, *no_buffers, EPS),
         lambda: reference.forward_train(*f64(x, weight, bias), *no_buffers, EPS), (False, False, False)),
        ("forward_train (no affine)", lambda: OPS.forward_train(x, None, None, *no_buffers, EPS),
         lambda: reference.forward_train(*f64(x), None, None, *no_buffers, EPS), (False, False, False)),
        ("batch_norm_eval", lambda: OPS.batch_norm_eval(x, weight, bias, running_mean, running_var, None, EPS),
         lambda: reference.batch_norm_eval(*f64(x, weight, bias, running_mean, running_var), None, EPS), (False,)),
        ("batch_stats", lambda: OPS.batch_stats(x), lambda: reference.batch_stats(*f64(x)), (False, False)),
        ("normalize", lambda: OPS.normalize(x, weight, bias, mean, invstd),
         lambda: reference.normalize(*f64(x, weight, bias, mean, invstd)), (False,)),
        ("backward (train)", lambda: OPS.backward(grad_output, x, weight, bias, mean, invstd, True, all_grads),
         lambda: reference.backward(*f64(grad_output, x, weight, bias, mean, invstd), True, all_grads), (True,) * 3),
        ("backward (eval)", lambda: OPS.backward(grad_output, x, weight, bias, mean, invstd, False, all_grads),
         lambda: reference.backward(*f64(grad_output, x, weight, bias, mean, invstd), False, all_grads), (True,) * 3),
        ("backward_reduce", lambda: OPS.backward_reduce(grad_output, x, mean, invstd, weight, bias, [True, True]),
         lambda: reference.backward_reduce(*f64(grad_output, x, mean, invstd, weight, bias), [True, True]),
         (True,) * 3),
        ("backward_elemt", lambda: OPS.backward_elemt(grad_output, x, weight, mean, invstd, sums, count),
         lambda: reference.backward_elemt(*f64(grad_output, x, weight, mean, invstd, sums), count), (True,)),
    ]


def op_check(device, shape, layout, dtype, param_dtype, seed: int) -> dict:
    """Every op on NaN-filled memory: no NaN in its outputs, each within
    tolerance of reference.py in float64, activations in the input's layout."""
    x, weight, bias, grad_output = selfcheck.sample(shape, layout, dtype, device,
                                                    torch.Generator(device).manual_seed(seed), param_dtype)
    _, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, 0.1, EPS)
    running_mean, running_var = (t.to(param_dtype) for t in OPS.batch_stats(x))
    activation_bytes = x.numel() * x.element_size()
    outputs = covered = 0
    errors = {}
    for label, call, reference_call, gradients in _op_calls(x, weight, bias, grad_output, mean, invstd,
                                                            running_mean, running_var):
        want = reference_call()
        want = want if isinstance(want, tuple) else (want,)
        with poisoned_allocations(device, 2 * activation_bytes) as poison:
            got = call()
            got = got if isinstance(got, tuple) else (got,)
            for index, (g, w, gradient) in enumerate(zip(got, want, gradients)):
                what = f"{label} output {index}"
                if g.shape == x.shape:
                    check_layout(what, g, shape, layout)
                if not torch.isfinite(g).all():
                    raise AssertionError(f"{what} holds NaN/Inf: an element no kernel wrote, or a wrong one")
                errors[f"{label}[{index}]"] = check_close(what, g, w, gradient)
                outputs += 1
                covered += poison.covers(g)
            del got, g
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the pools kept
    return {"errors": errors, "outputs": outputs, "outputs_on_poisoned_memory": covered}


def run_correctness(device: torch.device, cases, record: Callable) -> None:
    for index, (shape, layout) in enumerate(cases):
        passed = total = 0
        for dtype, param_dtype in DTYPES:
            label = f"{list(shape)} {layout} {dtype_label(dtype, param_dtype)}"
            for training in (True, False):
                for affine in (True, False):
                    case = f"{label} {'train' if training else 'eval'} {'affine' if affine else 'no-affine'}"
                    seed = 1000 * index + total
                    result = record(selfcheck.attempt("module", case, module_check, device, shape, layout, dtype,
                                                      param_dtype, training, affine, seed))
                    passed, total = passed + result.passed, total + 1
            result = record(selfcheck.attempt("ops", label, op_check, device, shape, layout, dtype, param_dtype,
                                              index))
            passed, total = passed + result.passed, total + 1
        synchronize(device)
        log(f"{list(shape)} {layout}: {passed}/{total} passed")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the large cases' blocks, and the poisoned pools


def summarize_errors(results: list[selfcheck.Result]) -> list[str]:
    """The largest relative error against float64 per dtype and quantity, over passing module checks."""
    worst: dict[str, dict[str, float]] = {}
    for result in results:
        if result.check != "module" or not result.passed:
            continue
        entry = worst.setdefault(result.details["dtypes"], {})
        for name, errors in result.details["errors"].items():
            entry[name] = max(entry.get(name, 0.0), errors["vs_float64"])
    return [
        f"  {dtypes:<18} " + ", ".join(f"{name} {error:.2g}" for name, error in by_name.items())
        for dtypes, by_name in worst.items()
    ]


# -- (c) graph capture and host synchronization ----------------------------------------------------
def small_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    return torch_safebn.convert_model(model.to(device))  # the default policy: on_nonfinite="raise"


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss


def _batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def graph_check(device: torch.device) -> dict:
    """A training step captured in a CUDA graph and replayed against the same
    steps run eagerly; then a NaN in the captured input."""
    # Deterministic cuDNN algorithms, so that replay and eager can agree bit for bit.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        return _graph_check(device)


def _graph_check(device: torch.device) -> dict:
    eager = small_model(device)
    graphed = copy.deepcopy(eager)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    graphed_optimizer = torch.optim.SGD(graphed.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 16, 16, generator=generator).to(device) for _ in range(6)]
    static_input = batches[0].clone()

    # Warm up on a side stream, as torch.cuda.graphs' documentation asks; the eager twin takes the same steps.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for x in batches[:3]:
            static_input.copy_(x)
            _train_step(graphed, graphed_optimizer, static_input)
    torch.cuda.current_stream(device).wait_stream(side)
    for x in batches[:3]:
        _train_step(eager, eager_optimizer, x)

    graph = torch.cuda.CUDAGraph()
    graphed_optimizer.zero_grad(set_to_none=True)  # the grads are allocated from the graph's pool
    with torch.cuda.graph(graph):
        static_loss = graphed(static_input).square().mean()
        static_loss.backward()
        graphed_optimizer.step()

    largest_difference = 0.0
    bitwise = True
    for step, x in enumerate(batches[3:]):
        static_input.copy_(x)
        graph.replay()
        loss = _train_step(eager, eager_optimizer, x)
        synchronize(device)
        pairs = [("loss", static_loss, loss)]
        pairs += [(f"parameter {name}", p, q) for (name, p), (_, q) in zip(graphed.named_parameters(),
                                                                          eager.named_parameters())]
        pairs += [(f"buffer {name}", b, c) for (name, b), (_, c) in zip(graphed.named_buffers(), eager.named_buffers())]
        for what, replayed, expected in pairs:
            if replayed.is_floating_point():
                largest_difference = max(largest_difference, relative_error(replayed, expected))
                torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, what=what, step=step: f"replay {step}, {what}: {m}")
            elif not torch.equal(replayed, expected):
                raise AssertionError(f"replay {step}, {what}: {replayed.tolist()} != {expected.tolist()}")
            bitwise = bitwise and torch.equal(replayed, expected)

    batch_norms = _batch_norms(graphed)
    before = {name: {key: getattr(m, key).clone() for key in ("running_mean", "running_var", "num_batches_tracked",
                                                               "safety_counters")}
              for name, m in batch_norms.items()}
    static_input[0, 0, 0, 0] = float("nan")
    graph.replay()
    synchronize(device)
    counted = {}
    for name, m in batch_norms.items():
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if not torch.equal(getattr(m, key), before[name][key]):
                raise AssertionError(f"{name}.{key} changed in the replay with a NaN input")
        counters = (m.safety_counters - before[name]["safety_counters"]).tolist()
        expected = {Counter.BATCHES: 1, Counter.SKIPPED_UPDATES: 1, Counter.NONFINITE_EVENTS: 1}
        if any(counters[slot] != value for slot, value in expected.items()):
            raise AssertionError(f"{name}: the NaN replay changed the counters by {counters}, expected +1 in "
                                 "batches, skipped_updates and nonfinite_events")
        counted[name] = counters[Counter.NONFINITE_EVENTS]
    try:
        torch_safebn.check(graphed)
    except torch_safebn.NonFiniteError as error:
        raised = str(error)[:200]
    else:
        raise AssertionError("check(model) did not raise after the NaN replay")
    return {"replays_compared": len(batches) - 3, "largest_relative_difference": largest_difference,
            "bitwise_equal": bitwise, "nonfinite_events_counted": counted, "check_raised_for": raised}


def sync_check(device: torch.device) -> dict:
    """Two eager training steps and an eval forward under
    torch.cuda.set_sync_debug_mode("warn"): every synchronizing call warns."""
    model = small_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    _train_step(model, optimizer, x)  # first calls: cuDNN handles, the allocator, the pinned snapshot buffer
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                _train_step(model, optimizer, x)
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            model.train()
    # The mode's own notice ("... a prototype feature ...") is not a synchronizing call.
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
             if "called a synchronizing CUDA operation" in str(w.message)]
    if syncs:
        raise AssertionError(f"{len(syncs)} synchronizing call(s):\n" + "\n".join(syncs))
    return {"training_steps": 2, "eval_forwards": 1, "synchronizing_calls": 0}


# -- (d) timings ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    """Some implementations timed on one workload; kind "core" or "compile"."""

    workload: layer_bench.Workload
    implementations: tuple[layer_bench.Implementation, ...]
    kind: str

    def label(self) -> str:
        return f"{self.workload.label()} [{', '.join(impl.name for impl in self.implementations)}]"


def timing_plan(device: torch.device, quick: bool) -> list[Step]:
    """Every step in the order it is to be measured (see TIMING). In quick
    mode: the quick shapes, two dtypes, and the first as the reference point."""
    shapes = QUICK_TIMING_SHAPES if quick else TIMING_SHAPES
    dtypes = TIMING_DTYPES[:2] if quick else TIMING_DTYPES
    points = {(QUICK_TIMING_SHAPES[0], "contiguous", F32, F32)} if quick else {
        (shape, layout, dtype, F32) for shape, layout, dtype in REFERENCE_POINTS}

    def is_reference_point(w: layer_bench.Workload) -> bool:
        return (w.shape, w.layout, w.dtype, w.param_dtype) in points

    training = layer_bench.workloads(shapes, layer_bench.LAYOUTS, dtypes, ["fwdbwd"])
    training.sort(key=lambda w: (not is_reference_point(w), dtypes.index((w.dtype, w.param_dtype))))
    reference_points = [w for w in training if is_reference_point(w)]
    others = layer_bench.workloads(QUICK_TIMING_SHAPES[:1] if quick else SUBSET_SHAPES, layer_bench.LAYOUTS,
                                   SUBSET_DTYPES, OTHER_PASSES)
    compile_peer = layer_bench.PEERS["compile"]
    core = (layer_bench.SAFEBN, layer_bench.SAFEBN_NOCHECKS, *(
        layer_bench.PEERS[name] for name in layer_bench.DEFAULT_PEERS
        if name != "compile" and device.type in layer_bench.PEERS[name].device_types))
    return ([Step(w, core, "core") for w in training]
            + [Step(w, (compile_peer,), "compile") for w in reference_points]
            + [Step(w, core, "core") for w in others]
            + [Step(w, (compile_peer,), "compile") for w in training + others if w not in reference_points])


class Budget:
    """Whether a step fits in what is left: each kind of step is assumed to
    cost the mean of the last three of its kind (PRIOR_COST_S before any)."""

    def __init__(self, clock: Clock, reserve_s: float):
        self.clock, self.reserve_s = clock, reserve_s
        self.costs: dict[str, list[float]] = {}

    def estimate(self, kind: str) -> float:
        recent = self.costs.get(kind, [])[-3:]
        return sum(recent) / len(recent) if recent else PRIOR_COST_S[kind]

    def fits(self, kind: str) -> bool:
        return self.clock.left() - self.reserve_s >= self.estimate(kind)

    def spent(self, kind: str, seconds: float) -> None:
        self.costs.setdefault(kind, []).append(seconds)


def run_timings(device: torch.device, plan: list[Step], min_run_time: float, clock: Clock) -> dict:
    """Measures the plan's steps while the budget lasts; returns the engine's
    result with "skipped" and "errors" added to its settings."""
    threads = torch.get_num_threads()
    budget = Budget(clock, FINISH_RESERVE_S)
    measured: dict[layer_bench.Workload, list] = {}
    copies: dict[layer_bench.Workload, list] = {}  # the copies timed with each workload's steps
    skipped, errors = [], []
    failures_in_a_row: dict[str, int] = {}
    with torch_threads(threads):
        machine = layer_bench.describe_machine(device, threads, min_run_time)
        log(f"copy bandwidth {machine['copy_gb_per_s']:.4g} GB/s; {len(plan)} steps, "
            f"{clock.left():.0f} s left")
        for step in plan:
            if failures_in_a_row.get(step.kind, 0) >= GIVE_UP_AFTER_ERRORS:
                skipped.append({"step": step.label(),
                                "reason": f"{GIVE_UP_AFTER_ERRORS} {step.kind} steps in a row failed"})
                continue
            if not budget.fits(step.kind):
                skipped.append({"step": step.label(), "reason": f"budget (estimate {budget.estimate(step.kind):.1f} s, "
                                                                f"{clock.left():.0f} s left)"})
                continue
            started = time.perf_counter()
            try:
                group, copy_measurement = layer_bench.measure(step.workload, step.implementations, device, threads,
                                                              min_run_time)
            except Exception as error:  # one workload failing to time must not end the run
                errors.append({"step": step.label(), "error": f"{type(error).__name__}: {error}".strip()[:2000],
                               "implementations": [impl.name for impl in step.implementations]})
                log(f"ERROR timing {step.label()}: {errors[-1]['error'][:300]}")
                failures_in_a_row[step.kind] = failures_in_a_row.get(step.kind, 0) + 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                budget.spent(step.kind, time.perf_counter() - started)
            failures_in_a_row[step.kind] = 0
            measured.setdefault(step.workload, []).extend(group)
            copies.setdefault(step.workload, []).append(copy_measurement)
            times = ", ".join(f"{impl.name} {m.median * 1e6:.1f} us" for impl, m in group)
            log(f"{step.workload.label()}: {times} ({time.perf_counter() - started:.1f} s)")
    rows = []
    for workload in dict.fromkeys(step.workload for step in plan):  # the plan's order
        if workload in measured:
            rows += layer_bench.workload_rows(workload, measured[workload], machine, copies[workload])
    settings = {"min_run_time_s": min_run_time, "budget_s": clock.budget_s, "skipped": skipped, "errors": errors}
    return layer_bench.make_result(machine, rows, settings)


# -- the run ---------------------------------------------------------------------------------------
def machine_block(device: torch.device) -> dict:
    block = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_safebn": torch_safebn.__version__,
        "backend": torch_safebn.backend(),
        "device": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        block.update(compute_capability=f"{properties.major}.{properties.minor}",
                     memory_gib=round(properties.total_memory / 2**30, 1),
                     cudnn=torch.backends.cudnn.version())
    return block


class Report:
    """Everything the run found, written to gpu_check.json after every section."""

    PRINTED_FAILURES = 20  # in full; the JSON has every one

    def __init__(self, path: str, args: argparse.Namespace, device: torch.device):
        self.path = path
        self.results: list[selfcheck.Result] = []
        self.failed = 0
        self.data = {"format": FORMAT, "arguments": vars(args), "machine": machine_block(device),
                     "results": [], "skipped": [], "timings": None}

    def record(self, result: selfcheck.Result) -> selfcheck.Result:
        self.results.append(result)
        self.failed += not result.passed
        if not result.passed and self.failed <= self.PRINTED_FAILURES:
            log(f"FAIL  {result.check:<9}  {result.case}\n      " + result.error.replace("\n", "\n      "))
            if self.failed == self.PRINTED_FAILURES:
                log(f"(further failures are listed in {os.path.basename(self.path)} and at the end)")
        return result

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"check": what, "reason": why})
        log(f"SKIP  {what}: {why}")

    def failures(self) -> list[selfcheck.Result]:
        failed = [r for r in self.results if not r.passed]
        timings = self.data["timings"]
        for error in timings["settings"]["errors"] if timings else []:
            if {"safebn", "safebn-nochecks"} & set(error["implementations"]):
                failed.append(selfcheck.Result("timing", error["step"], error["error"]))
        return failed

    def write(self) -> None:
        self.data["results"] = [dataclasses.asdict(r) for r in self.results]
        self.data["elapsed_s"] = round(CLOCK.elapsed(), 1)
        self.data["passed"] = not self.failures()
        with open(self.path, "w") as file:
            json.dump(self.data, file, indent=1, default=str)


def correctness_section(report: Report, device: torch.device, quick: bool) -> None:
    section("(a) correctness: SafeBatchNorm against nn.BatchNorm and float64; every op on NaN-filled memory")
    run_correctness(device, QUICK_CASES if quick else CASES, report.record)
    op_results = [r for r in report.results if r.check == "ops" and r.passed]
    covered = sum(r.details["outputs_on_poisoned_memory"] for r in op_results)
    outputs = sum(r.details["outputs"] for r in op_results)
    log(f"op outputs allocated on NaN-filled memory: {covered} of {outputs}"
        + ("" if device.type == "cuda" else " (the CPU allocator caches nothing to fill)"))
    log("largest relative error against float64 (module checks):")
    for line in summarize_errors(report.results):
        print(line, flush=True)


def selfcheck_section(report: Report, device: torch.device, quick: bool) -> None:
    section("(b) selfcheck: parity, gradcheck and gradgradcheck in float64, opcheck of every op")
    counts: dict[str, list[int]] = {}
    for result in selfcheck.run_checks(devices=[device], second_order=True, op_cases=OP_CASES[:1] if quick else OP_CASES):
        report.record(result)
        counts.setdefault(result.check, [0, 0])[0] += result.passed
        counts[result.check][1] += 1
    log(", ".join(f"{check} {passed}/{total}" for check, (passed, total) in counts.items()) + " passed")


def host_sync_section(report: Report, device: torch.device, quick: bool) -> None:
    section("(c) no host synchronization: CUDA graph capture, sync debug mode")
    if device.type != "cuda":
        report.skip("graph capture", "needs CUDA")
        report.skip("sync debug mode", "needs CUDA")
        return
    for check, function in (("graph", graph_check), ("sync", sync_check)):
        result = report.record(selfcheck.attempt(check, f"{device.type} conv-bn-relu training step", function, device))
        if result.passed:
            log(f"PASS  {check}: {result.details}")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a dry run (default: cuda)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="seconds for the whole run; timings stop where it ends (default: 240)")
    parser.add_argument("--quick", action="store_true", help="small shapes only: a dry run of every code path")
    parser.add_argument("--min-run-time", type=float, default=None, metavar="SECONDS",
                        help=f"timed seconds per implementation and workload at the least (default: "
                             f"{MIN_RUN_TIME_S['cuda']} on cuda, {MIN_RUN_TIME_S['cpu']} on cpu)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="folder for the JSON (default: $OUT, else ./gpu_check_out)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global CLOCK
    args = _arguments(argv)
    CLOCK = Clock(args.budget_s)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    log(f"torch {torch.__version__}, torch_safebn {torch_safebn.__version__} (backend {torch_safebn.backend()}), "
        f"python {platform.python_version()}; device {args.device}, budget {args.budget_s:.0f} s")
    if device.type == "cuda" and not (torch.cuda.is_available() and torch_safebn.backend() == "cuda+cpu"):
        error = ("--device cuda needs a GPU and the extension built with CUDA kernels: "
                 f"cuda available {torch.cuda.is_available()}, backend {torch_safebn.backend()}")
        log(f"FAIL  {error}")
        with open(os.path.join(args.out, "gpu_check.json"), "w") as file:
            json.dump({"format": FORMAT, "arguments": vars(args), "passed": False, "error": error}, file, indent=1)
        return 2
    report = Report(os.path.join(args.out, "gpu_check.json"), args, device)
    for run_section in (correctness_section, selfcheck_section, host_sync_section):
        run_section(report, device, args.quick)
        report.write()

    section("(d) timings: torch_safebn.tools.layer_bench, in priority order within the budget")
    plan = timing_plan(device, args.quick)
    min_run_time = args.min_run_time or MIN_RUN_TIME_S[device.type]
    timings = run_timings(device, plan, min_run_time, CLOCK)
    report.data["timings"] = timings
    skipped = timings["settings"]["skipped"]
    if skipped:
        log(f"skipped: {len(skipped)} of {len(plan)} steps (all listed in {os.path.basename(report.path)}), "
            f"the first: {skipped[0]['step']}: {skipped[0]['reason']}")
    timings_path = os.path.join(args.out, f"timings-{device.type}.json")
    layer_bench.write_json(timings, timings_path)
    report.write()

    section("(e) summary")
    failures = report.failures()
    log(f"wrote {report.path} and {timings_path}")
    for failure in failures[:Report.PRINTED_FAILURES]:
        print(f"  FAIL  {failure.check:<9}  {failure.case}", flush=True)
    if len(failures) > Report.PRINTED_FAILURES:
        print(f"  ... and {len(failures) - Report.PRINTED_FAILURES} more in {os.path.basename(report.path)}", flush=True)
    log(f"{'FAIL' if failures else 'PASS'}: {len(failures)} failure(s) in {len(report.results)} checks and "
        f"{len(plan) - len(skipped)} timing steps ({len(skipped)} skipped); {CLOCK.elapsed():.0f} s of "
        f"{args.budget_s:.0f}")
    print(flush=True)
    print(format_compact_table(timings) if timings["rows"] else "no timing rows: the budget ran out first", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
