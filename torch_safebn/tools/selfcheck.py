"""`torch-safebn check`: a self-test of the installed build on every available
device, in well under a minute on a CPU. Three kinds of check:

  parity     the batch norm under test against native F.batch_norm, training and
             eval: outputs (and their layout), running statistics, gradients
  gradcheck  the batch norm under test in float64, training and eval
             (and gradgradcheck, with second_order=True)
  opcheck    torch.library.opcheck on every safebn op (schema, fake kernel,
             autograd registration)

The batch norm under test is a parameter, torch_safebn.functional.batch_norm
by default: any function with F.batch_norm's signature can be checked, which is
how the tests prove that a broken one fails. benchmarks/gpu_check.py runs the
same checks on the GPU and builds its own on the helpers here (Result, attempt,
sample, memory_format, op_samples).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

import torch
import torch.nn.functional as F

from torch_safebn import functional
from torch_safebn._ops import OPS
from torch_safebn.contract import NUM_COUNTERS

__all__ = ["Result", "attempt", "available_devices", "main", "memory_format", "op_samples", "run_checks", "sample"]

BatchNorm = Callable[..., torch.Tensor]  # F.batch_norm's signature

MOMENTUM, EPS = 0.1, 1e-5
SHAPES = ((8, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 4, 5, 6))
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# (shape, layout, dtype) of the ops' sample arguments for opcheck.
OP_CASES = (((4, 3, 5, 6), "contiguous", torch.float32),)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (rtol, atol) against native: float32 statistics are summed in another order,
# bfloat16 outputs may round to the neighbouring value.
_TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


@dataclasses.dataclass(frozen=True)
class Result:
    check: str  # "parity", "gradcheck" or "opcheck"
    case: str  # what was checked, e.g. "cpu float32 [4, 3, 5, 6] channels_last"
    error: str | None  # None when it passed
    details: dict | None = None  # what a passing check measured, if it says (e.g. its largest error)

    @property
    def passed(self) -> bool:
        return self.error is None


def available_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def run_checks(
    batch_norm: BatchNorm = functional.batch_norm, devices=None, *, second_order: bool = False, op_cases=OP_CASES
) -> Iterator[Result]:
    """Yields one Result per check, as it completes. second_order adds
    gradgradcheck to each gradcheck; op_cases are the (shape, layout, dtype)
    of the arguments each op is opchecked with."""
    for device in devices or available_devices():
        for shape in SHAPES:
            for layout in ("contiguous", "channels_last") if len(shape) in _CHANNELS_LAST else ("contiguous",):
                for dtype in DTYPES:
                    case = f"{device.type} {_dtype_name(dtype)} {list(shape)} {layout}"
                    yield attempt("parity", case, _parity, batch_norm, device, shape, layout, dtype)
        for training in (True, False):
            for shape, layout in (((3, 2, 4), "contiguous"), ((2, 3, 3, 2), "channels_last")):
                case = f"{device.type} float64 {list(shape)} {layout} {'training' if training else 'eval'}"
                yield attempt("gradcheck", case, _gradcheck, batch_norm, device, shape, layout, training, second_order)
        for shape, layout, dtype in op_cases:
            arguments = f"{_dtype_name(dtype)} {list(shape)} {layout}"
            try:
                samples = op_samples(device, shape, layout, dtype)
            except Exception as error:  # the ops cannot even run here: one failure says so
                yield Result("opcheck", f"{device.type} sample inputs {arguments}", _describe(error))
                continue
            for label, op_name, args in samples:
                yield attempt("opcheck", f"{device.type} safebn::{label} {arguments}", _opcheck, op_name, args)


def main(batch_norm: BatchNorm = functional.batch_norm, devices=None, out: TextIO | None = None) -> int:
    """Prints PASS/FAIL per check (to stdout by default) and returns the exit
    status: 0 when all passed."""
    out = out or sys.stdout
    start = time.perf_counter()
    failed = passed = 0
    for result in run_checks(batch_norm, devices):
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.check:<9}  {result.case}", file=out, flush=True)
        if result.passed:
            passed += 1
        else:
            failed += 1
            print("      " + result.error.replace("\n", "\n      "), file=out)
    print(f"{passed} passed, {failed} failed in {time.perf_counter() - start:.1f} s", file=out)
    return 1 if failed else 0


def attempt(check: str, case: str, function: Callable[..., dict | None], *args) -> Result:
    """Runs one check: it fails by raising, and may return details of what it measured."""
    try:
        details = function(*args)
    except Exception as error:  # report it and go on to the next
        return Result(check, case, _describe(error))
    return Result(check, case, None, details)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".strip()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def memory_format(shape, layout: str) -> torch.memory_format:
    """contiguous, or channels_last (channels_last_3d for 5-D shapes; either name is taken)."""
    return _CHANNELS_LAST[len(shape)] if layout.startswith("channels_last") else torch.contiguous_format


def sample(shape, layout: str, dtype: torch.dtype, device: torch.device, generator: torch.Generator,
           param_dtype: torch.dtype | None = None):
    """(x, weight, bias, grad_output) with non-trivial values; x in the layout asked for.
    The parameters are float64 for float64 input and float32 otherwise, unless param_dtype says.
    The values are drawn on the generator's device (a CUDA generator draws large samples fast)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device) * 2 + 0.5
    layout_format = memory_format(shape, layout)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=layout_format)
    if param_dtype is None:
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    draw = {"generator": generator, "dtype": torch.float64, "device": generator.device}
    weight = (torch.rand(channels, **draw) + 0.5).to(device, param_dtype)
    bias = torch.randn(channels, **draw).to(device, param_dtype)
    grad_output = torch.randn(shape, **draw).to(device=device, dtype=dtype)
    return x, weight, bias, grad_output.contiguous(memory_format=layout_format)


def _one_step(batch_norm: BatchNorm, x, weight, bias, grad_output) -> dict[str, torch.Tensor]:
    """A training step (forward, backward, running statistics), then an eval forward."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    running_mean = torch.zeros_like(weight, requires_grad=False)
    running_var = torch.ones_like(weight, requires_grad=False)
    output = batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
    grad_input, grad_weight, grad_bias = torch.autograd.grad(output, (x, weight, bias), grad_output)
    with torch.no_grad():
        eval_output = batch_norm(x, running_mean, running_var, weight, bias, False, MOMENTUM, EPS)
    return {
        "output": output, "running_mean": running_mean, "running_var": running_var, "grad_input": grad_input,
        "grad_weight": grad_weight, "grad_bias": grad_bias, "eval_output": eval_output,
    }


def _parity(batch_norm: BatchNorm, device, shape, layout, dtype) -> None:
    """Against F.batch_norm and against F.batch_norm in float64 on the same values.
    Native's own largest error from float64 is allowed on top against native:
    cuDNN sums half-precision gradients in half precision."""
    x, weight, bias, grad_output = sample(shape, layout, dtype, device, torch.Generator().manual_seed(0))
    native = _one_step(F.batch_norm, x, weight, bias, grad_output)
    float64 = _one_step(F.batch_norm, *(t.double() for t in (x, weight, bias, grad_output)))
    actual = _one_step(batch_norm, x, weight, bias, grad_output)
    rtol, atol = _TOLERANCE[dtype]
    for name, got in actual.items():
        reference = float64[name].to(got.dtype)
        torch.testing.assert_close(got, reference, rtol=rtol, atol=atol,
                                   msg=lambda text, name=name: f"{name} against float64: {text}")
        native_error = (native[name].double() - float64[name]).abs().max().item()
        torch.testing.assert_close(got, native[name], rtol=rtol, atol=atol + native_error,
                                   msg=lambda text, name=name: f"{name} against native: {text}")
    for name in ("output", "grad_input", "eval_output"):
        if not actual[name].is_contiguous(memory_format=memory_format(shape, layout)):
            raise AssertionError(f"{name} is not {layout} like the input: strides {actual[name].stride()}")


def _gradcheck(batch_norm: BatchNorm, device, shape, layout, training: bool, second_order: bool = False) -> None:
    x, weight, bias, _ = sample(shape, layout, torch.float64, device, torch.Generator().manual_seed(1))
    running_mean = torch.randn_like(weight) * 0.1
    running_var = torch.rand_like(weight) + 0.5

    def normalize(x, weight, bias):
        # Fresh buffers for every call: gradcheck calls many times, and a
        # training step would move the statistics under it.
        return batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, MOMENTUM, EPS)

    inputs = tuple(t.detach().requires_grad_() for t in (x, weight, bias))
    torch.autograd.gradcheck(normalize, inputs, raise_exception=True)
    if second_order:
        torch.autograd.gradgradcheck(normalize, inputs, raise_exception=True)


def op_samples(device: torch.device, shape=(4, 3, 5, 6), layout: str = "contiguous",
               dtype: torch.dtype = torch.float32) -> list[tuple[str, str, tuple]]:
    """(label, op name, arguments) for every safebn op, the ops with optional
    arguments or flags twice: with and without them."""
    x, weight, bias, grad_output = sample(shape, layout, dtype, device, torch.Generator().manual_seed(2))
    _, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, MOMENTUM, EPS)
    sums = OPS.backward_reduce(grad_output, x, mean, invstd, weight, bias, [False, False])[0]
    count = x.numel() // x.shape[1]
    running_mean, running_var = OPS.batch_stats(x)  # statistics that eval mode may use

    def buffers():  # (running_mean, running_var, num_batches_tracked, counters): each mutating op its own
        return (torch.zeros_like(weight), torch.ones_like(weight), torch.zeros((), dtype=torch.int64, device=device),
                torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device))

    differentiable = tuple(t.detach().clone().requires_grad_() for t in (x, weight, bias))
    return [
        ("forward_train", "forward_train", (*differentiable, *buffers(), MOMENTUM, EPS)),
        ("forward_train (no affine, no buffers)", "forward_train",
         (differentiable[0], None, None, None, None, None, None, MOMENTUM, EPS)),
        ("batch_norm_eval", "batch_norm_eval", (*differentiable, running_mean, running_var, buffers()[3], EPS)),
        ("batch_norm_eval (no checks)", "batch_norm_eval", (*differentiable, running_mean, running_var, None, EPS)),
        ("backward", "backward", (grad_output, x, weight, bias, mean, invstd, True, [True, True, True])),
        ("backward (eval, no grad_weight)", "backward",
         (grad_output, x, weight, None, mean, invstd, False, [True, False, True])),
        ("batch_stats", "batch_stats", (x,)),
        ("normalize", "normalize", (x, weight, bias, mean, invstd)),
        ("backward_reduce", "backward_reduce", (grad_output, x, mean, invstd, weight, bias, [True, True])),
        ("backward_reduce (no affine, no parameter gradients)", "backward_reduce",
         (grad_output, x, mean, invstd, None, None, [False, False])),
        ("backward_elemt", "backward_elemt", (grad_output, x, weight, mean, invstd, sums, count)),
        ("update_running_stats", "update_running_stats", (*buffers(), mean, invstd, weight, bias, count, EPS, MOMENTUM)),
    ]


def _opcheck(op_name: str, args: tuple) -> None:
    torch.library.opcheck(getattr(OPS, op_name).default, args, raise_exception=True)
