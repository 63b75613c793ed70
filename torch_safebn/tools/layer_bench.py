"""The layer benchmark: times torch_safebn against native batch norm, one
layer at a time, and returns plain rows (a dict that json.dump takes).

The CLI (`torch-safebn bench`) and the suites under benchmarks/ call run();
benchmarks/gpu_check.py schedules workloads itself under a time budget and
calls run()'s steps (describe_machine, measure, workload_rows, make_result);
host_bench times the same workloads' statements for their host cost. All of
them time with timing.time_in_turns.

What a row measures
  workload  shape x layout x (input dtype, parameter dtype) x pass
  impl      "safebn" (SafeBatchNorm*, checks on), "safebn-nochecks" (checks=False),
            and the peers: "native" (F.batch_norm, eager), "native-nocudnn" (the same
            with cuDNN off; GPU only), "compile" (torch.compile of F.batch_norm) and
            "native-module" (nn.BatchNorm1d/2d/3d itself, the module's Python included).
  passes    fwd = training forward with autograd recording; bwd = the backward
            alone (one forward, then autograd.grad with retain_graph); fwdbwd = both;
            eval = inference forward under no_grad with the running statistics.

How bytes are counted: a pass moves a whole number of passes over the activation
(numel x input element size), the least any implementation can move:
  fwd 3 (read x for the statistics, read x, write y), bwd 5 (read dy and x for the
  reductions, read dy and x, write dx), fwdbwd 8, eval 2 (read x, write y).
Per-channel parameters and statistics are left out. GB/s is those bytes over the
median time; % of copy bandwidth compares that with a copy_ of COPY_BYTES (read +
write) timed in turns with the workload's implementations, on the same device with
the same threads.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence

import torch
import torch._functorch.config  # the bwd pass patches it: not imported until torch.compile runs
import torch.nn.functional as F
from torch import nn

from torch_safebn import convert_model

from .machine import machine_block, torch_threads
from .timing import Measurement, time_in_turns

__all__ = [
    "ACTIVATION_PASSES",
    "DEFAULT_PEERS",
    "FORMAT",
    "LAYOUTS",
    "PEERS",
    "PRESETS",
    "ROW_FIELDS",
    "SAFEBN",
    "SAFEBN_NOCHECKS",
    "Implementation",
    "Workload",
    "check_devices",
    "describe_machine",
    "dtype_label",
    "make_result",
    "measure",
    "measure_copy_bandwidth",
    "parse_dtype",
    "parse_shape",
    "run",
    "statements",
    "timing_fields",
    "workload_groups",
    "workload_rows",
    "workloads",
    "write_json",
]

FORMAT = "torch_safebn.benchmark/1"

# Passes over the activation that each pass must make at the least (see the module docstring).
ACTIVATION_PASSES = {"fwd": 3, "bwd": 5, "fwdbwd": 8, "eval": 2}

LAYOUTS = ("contiguous", "channels_last")

PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    # `make bench` (check included) must end within 3 minutes on 2 shared CPU cores with
    # a cold torch.compile cache: each workload costs a compile of a few seconds.
    "quick": ((8, 64, 56, 56),),
    # The batch-norm inputs of torchvision's ResNet-50 at batch 32 and 224 x 224.
    "resnet50": (
        (32, 64, 112, 112), (32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 56, 56),
        (32, 128, 28, 28), (32, 512, 28, 28), (32, 256, 28, 28), (32, 256, 14, 14),
        (32, 1024, 14, 14), (32, 512, 14, 14), (32, 512, 7, 7), (32, 2048, 7, 7),
    ),
    # Issue 5's CPU list.
    "full": (
        (32, 64, 56, 56), (64, 64, 112, 112), (64, 512, 7, 7), (8, 3, 224, 224),
        (128, 256, 14, 14), (8192, 512), (4, 32, 16, 32, 32),
    ),
}

MIN_RUNS_FOR_IQR = 4  # fewer timed blocks have no meaningful quartiles

# Each row's fields, their types and meaning: the JSON's documented contract.
ROW_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "torch_version": (str, "torch.__version__"),
    "device": (str, "CPU model (from /proc/cpuinfo) or GPU name"),
    "threads": (int, "torch threads the timer ran with"),
    "impl": (str, "safebn, safebn-nochecks, native, native-nocudnn, compile or native-module"),
    "pass": (str, "fwd, bwd, fwdbwd or eval"),
    "shape": (list, "input shape, N first"),
    "layout": (str, "contiguous, or channels_last (channels_last_3d for 5-D input)"),
    "dtype": (str, "input (and output) dtype"),
    "param_dtype": (str, "dtype of weight, bias and running statistics"),
    "median_us": (float, "median time of one pass, microseconds"),
    "iqr_us": ((float, type(None)), f"interquartile range of the timed blocks, microseconds; null under {MIN_RUNS_FOR_IQR} runs"),
    "runs": (int, "timed blocks behind the median and IQR"),
    "bytes": (int, "bytes the pass moves at the least: passes over the activation x its size"),
    "gb_per_s": (float, "bytes / median, 1e9 bytes per second"),
    "copy_gb_per_s": (float, "GB/s of a copy of COPY_BYTES timed in turns with this workload's implementations"),
    "pct_copy_bandwidth": (float, "gb_per_s as a percentage of copy_gb_per_s"),
    "speedup_vs_best_peer": ((float, type(None)), "fastest peer's median / this median; null without peers"),
    "speedup_vs_native": ((float, type(None)), "native's median / this median; null when native was not run"),
}


# -- workloads ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """What one group of rows measures; every implementation runs it."""

    shape: tuple[int, ...]
    layout: str
    dtype: torch.dtype
    param_dtype: torch.dtype
    pass_name: str

    @property
    def bytes(self) -> int:
        return ACTIVATION_PASSES[self.pass_name] * math.prod(self.shape) * self.dtype.itemsize

    @property
    def training(self) -> bool:
        return self.pass_name != "eval"

    def label(self) -> str:
        dtypes = dtype_label(_dtype_name(self.dtype), _dtype_name(self.param_dtype))
        return f"{self.pass_name} {'x'.join(map(str, self.shape))} {self.layout} {dtypes}"


def dtype_label(dtype: str, param_dtype: str) -> str:
    """"bfloat16/float32" for mixed precision, "float32" when both agree."""
    return dtype if dtype == param_dtype else f"{dtype}/{param_dtype}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_shape(text: str) -> tuple[int, ...]:
    """"32x64x56x56" -> (32, 64, 56, 56); 2 to 5 dimensions, as batch norm takes."""
    try:
        shape = tuple(int(size) for size in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is sizes joined by 'x', like 32x64x56x56; got {text!r}") from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise ValueError(f"batch norm takes 2 to 5 dimensions of positive size, got {text!r}")
    return shape


def parse_dtype(text: str) -> tuple[torch.dtype, torch.dtype]:
    """"INPUT[/PARAM]" -> (input dtype, parameter dtype). Without PARAM, half and
    bfloat16 input gets float32 parameters (mixed precision, as autocast leaves
    them) and float32/float64 input its own dtype."""
    names = text.split("/")
    if len(names) > 2:
        raise ValueError(f"a dtype is INPUT or INPUT/PARAM, like bfloat16/float32; got {text!r}")
    dtypes = []
    for name in names:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{name!r} is not a floating-point torch dtype (float32, bfloat16, float16, float64)")
        dtypes.append(dtype)
    if len(dtypes) == 1:
        dtypes.append(dtypes[0] if dtypes[0] in (torch.float32, torch.float64) else torch.float32)
    return dtypes[0], dtypes[1]


def workloads(
    shapes: Sequence[tuple[int, ...]],
    layouts: Sequence[str],
    dtypes: Sequence[tuple[torch.dtype, torch.dtype]],
    passes: Sequence[str],
) -> list[Workload]:
    """Every combination, except channels_last for inputs that have no such
    layout (it exists for 4-D and, as channels_last_3d, 5-D inputs only)."""
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    for pass_name in passes:
        if pass_name not in ACTIVATION_PASSES:
            raise ValueError(f"unknown pass {pass_name!r}: choose from {', '.join(ACTIVATION_PASSES)}")
    return [
        Workload(tuple(shape), layout, dtype, param_dtype, pass_name)
        for shape, layout, (dtype, param_dtype), pass_name in itertools.product(shapes, layouts, dtypes, passes)
        if layout == "contiguous" or len(shape) in (4, 5)
    ]


# -- implementations -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Implementation:
    """A batch norm to time. build(template) returns a module computing it over
    the template's parameters and buffers (or over a copy of them)."""

    name: str
    is_peer: bool
    build: Callable[[nn.Module], nn.Module]
    device_types: tuple[str, ...] = ("cpu", "cuda")


class _Functional(nn.Module):
    """A batch_norm function with F.batch_norm's signature, over a template module's state."""

    def __init__(self, template: nn.Module, batch_norm: Callable[..., torch.Tensor]):
        super().__init__()
        self.template = template
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.template
        return self.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, bn.momentum, bn.eps)


def _safebn(checks: bool) -> Callable[[nn.Module], nn.Module]:
    # Timed as users run it: a module swapped in by convert_model.
    return lambda template: convert_model(template, checks=checks)


def _native_without_cudnn(*args) -> torch.Tensor:
    # The forward picks the kernel, and its backward follows that choice.
    with torch.backends.cudnn.flags(enabled=False):
        return F.batch_norm(*args)


def _compiled(template: nn.Module) -> nn.Module:
    # A fresh compile per workload: no recompilation limit reached, and no
    # dynamic-shape graph carried over from an earlier shape.
    torch._dynamo.reset()
    return _Functional(template, torch.compile(F.batch_norm, dynamic=False))


SAFEBN = Implementation("safebn", False, _safebn(checks=True))
SAFEBN_NOCHECKS = Implementation("safebn-nochecks", False, _safebn(checks=False))
PEERS = {
    "native": Implementation("native", True, lambda template: _Functional(template, F.batch_norm)),
    "native-nocudnn": Implementation(
        "native-nocudnn", True, lambda template: _Functional(template, _native_without_cudnn), device_types=("cuda",)
    ),
    "compile": Implementation("compile", True, _compiled),
    # The module as users run it: its Python forward (input check, num_batches_tracked += 1),
    # then F.batch_norm. The peer that does the same work as SafeBatchNorm, for host costs.
    "native-module": Implementation("native-module", True, lambda template: template),
}
# The layer benchmark's peers when none are named (those the device has): the kernels'
# competitors. native-module adds only its Python to native's time.
DEFAULT_PEERS = ("native", "native-nocudnn", "compile")


# -- timing --------------------------------------------------------------------------------
COPY_BYTES = 256 * 2**20  # well past any last-level cache, CPU or GPU


@functools.cache
def _copy_statement(device: torch.device, nbytes: int) -> Callable[[], object]:
    """dst.copy_(src) over nbytes; its buffers are kept for the process's next workloads."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def copy_gb_per_s(seconds: float) -> float:
    """A copy's GB/s, counting the read and the write."""
    return 2 * COPY_BYTES / seconds / 1e9


def measure_copy_bandwidth(device: torch.device, threads: int, min_run_time: float) -> float:
    """The machine's copy bandwidth at the start of a run, for the table's
    header and the plot's roofline. The fastest timed block counts: a
    ceiling. The rows compare with a copy timed in turns with them instead."""
    return copy_gb_per_s(min(time_in_turns([_copy_statement(device, COPY_BYTES)], threads, min_run_time)[0].times))


def _statement(workload: Workload, module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> Callable:
    """What one timed call runs for the workload's pass."""
    forward = module.train(workload.training)
    if workload.pass_name == "eval":
        def run():
            with torch.no_grad():
                return forward(x)
        return run
    if workload.pass_name == "fwd":
        return lambda: forward(x)
    wanted = [x, *module.parameters()]
    if workload.pass_name == "bwd":
        # One graph, backward again and again (retain_graph=True): AOTAutograd's
        # donated buffers forbid that, so torch.compile compiles this forward without them.
        with torch._functorch.config.patch(donated_buffer=False):
            output = forward(x)
        return lambda: torch.autograd.grad(output, wanted, grad_output, retain_graph=True)
    return lambda: torch.autograd.grad(forward(x), wanted, grad_output)


_NATIVE_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_MEMORY_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def _inputs(workload: Workload, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(x, grad_output, template module) for a workload; x requires grad when training."""
    x = torch.randn(workload.shape, dtype=workload.dtype, device=device)
    if workload.layout == "channels_last":
        x = x.contiguous(memory_format=_MEMORY_FORMAT[x.dim()])
    x.requires_grad_(workload.training)
    template = _NATIVE_CLASS[x.dim()](workload.shape[1], device=device, dtype=workload.param_dtype)
    return x, torch.randn_like(x), template


# -- the run -------------------------------------------------------------------------------
def check_devices(implementations: Sequence[Implementation], device: torch.device) -> None:
    """Raises ValueError for an implementation that does not run on the device."""
    for impl in implementations:
        if device.type not in impl.device_types:
            raise ValueError(f"{impl.name} runs on {', '.join(impl.device_types)} only, not {device.type}")


def describe_machine(device: torch.device, threads: int, min_run_time: float) -> dict:
    """The result's "machine" block, the copy bandwidth measured on the device included."""
    return {
        **machine_block(device, threads),
        "copy_bytes": COPY_BYTES,
        "copy_gb_per_s": measure_copy_bandwidth(device, threads, min_run_time),
    }


def statements(workload: Workload, implementations: Sequence[Implementation], device: torch.device) -> list[Callable]:
    """One timed call of each implementation on the workload, over the same input.
    Each implementation gets its own copy of the module's state: they run in
    turns, and one's running-statistics update would bump the version of
    buffers that another's retained graph (the bwd pass) saved."""
    x, grad_output, template = _inputs(workload, device)
    return [_statement(workload, impl.build(copy.deepcopy(template)), x, grad_output) for impl in implementations]


def measure(
    workload: Workload,
    implementations: Sequence[Implementation],
    device: torch.device,
    threads: int,
    min_run_time: float,
    on_measured: Callable[[Workload, Implementation], None] | None = None,
) -> tuple[list[tuple[Implementation, Measurement]], Measurement]:
    """Times each implementation on one workload, over the same input, in turns,
    and a copy of COPY_BYTES in the same turns: the bandwidth the rows are a
    percentage of then holds under the same conditions (a VM's speed can drift
    twofold in minutes). Returns ([(implementation, measurement)], the copy's)."""
    timed_statements = [*statements(workload, implementations, device), _copy_statement(device, COPY_BYTES)]
    *timed, copy_measurement = time_in_turns(timed_statements, threads, min_run_time)
    group = list(zip(implementations, timed))
    if on_measured:
        for impl in implementations:
            on_measured(workload, impl)
    return group, copy_measurement


def make_result(machine: dict, rows: list[dict], settings: dict, format_name: str = FORMAT) -> dict:
    """The result run() returns, from a machine block and rows."""
    return {
        "format": format_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "rows": rows,
    }


def run(
    plan: Sequence[Workload],
    implementations: Sequence[Implementation],
    device: str | torch.device = "cpu",
    threads: int | None = None,
    min_run_time: float = 0.2,
    on_measured: Callable[[Workload, Implementation], None] | None = None,
) -> dict:
    """Times every implementation on every workload of the plan and returns
    {"format", "created", "machine": {..., "copy_gb_per_s"}, "settings", "rows"}.
    threads defaults to torch's current count; on_measured(workload, impl) is called for
    each row once its workload is measured (its implementations are timed in turns)."""
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    check_devices(implementations, device)
    with torch_threads(threads):
        machine = describe_machine(device, threads, min_run_time)
        rows = []
        for workload in plan:
            group, copy_measurement = measure(workload, implementations, device, threads, min_run_time, on_measured)
            rows += workload_rows(workload, group, machine, [copy_measurement])
    return make_result(machine, rows, {"min_run_time_s": min_run_time})


def timing_fields(workload: Workload, group: list[tuple[Implementation, Measurement]], machine: dict) -> list[dict]:
    """Per implementation of a workload, the fields of its row that every
    benchmark of workloads shares: what was timed, its median and IQR, and the
    speed-ups over the peers timed with it (group is measure()'s list)."""
    peer_medians = [measurement.median for impl, measurement in group if impl.is_peer]
    native_medians = [measurement.median for impl, measurement in group if impl.name == "native"]
    rows = []
    for impl, measurement in group:
        median, runs = measurement.median, len(measurement.times)
        rows.append({
            "torch_version": machine["torch_version"],
            "device": machine["device"],
            "threads": machine["threads"],
            "impl": impl.name,
            "pass": workload.pass_name,
            "shape": list(workload.shape),
            "layout": workload.layout,
            "dtype": _dtype_name(workload.dtype),
            "param_dtype": _dtype_name(workload.param_dtype),
            "median_us": median * 1e6,
            "iqr_us": measurement.iqr * 1e6 if runs >= MIN_RUNS_FOR_IQR else None,
            "runs": runs,
            "speedup_vs_best_peer": min(peer_medians) / median if peer_medians else None,
            "speedup_vs_native": native_medians[0] / median if native_medians else None,
        })
    return rows


def workload_rows(workload: Workload, group: list[tuple[Implementation, Measurement]], machine: dict,
                  copies: list[Measurement]) -> list[dict]:
    """One row per implementation of a workload (ROW_FIELDS, in that order):
    group is measure()'s list, or several of them joined, and copies the copies
    timed with them (their median copy time is the rows' copy bandwidth)."""
    copy_bandwidth = copy_gb_per_s(statistics.median(m.median for m in copies))
    rows = []
    for fields in timing_fields(workload, group, machine):
        gb_per_s = workload.bytes / (fields["median_us"] * 1e-6) / 1e9
        fields.update(bytes=workload.bytes, gb_per_s=gb_per_s, copy_gb_per_s=copy_bandwidth,
                      pct_copy_bandwidth=100 * gb_per_s / copy_bandwidth)
        rows.append({field: fields[field] for field in ROW_FIELDS})
    return rows


def workload_groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """A result's rows by workload: {(pass, shape, layout, dtype, param_dtype): {impl: row}},
    in the order they were measured."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["pass"], tuple(row["shape"]), row["layout"], row["dtype"], row["param_dtype"])
        groups.setdefault(key, {})[row["impl"]] = row
    return groups


def write_json(result: dict, path: str) -> None:
    """The result as JSON, one row per line so that results diff well in git."""
    head = {key: value for key, value in result.items() if key != "rows"}
    text = json.dumps(head, indent=1)[:-2]  # without its closing "\n}": the rows follow
    rows = ",\n  ".join(json.dumps(row) for row in result["rows"])
    with open(path, "w") as file:
        file.write(f"{text},\n \"rows\": [\n  {rows}\n ]\n}}\n")
