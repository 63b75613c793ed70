"""The model benchmark (`torch-safebn bench --model NAME`): the time of one
training step of a whole model, native and converted by
torch_safebn.convert_model, timed in turns in the same process
(timing.time_in_turns), eager and under torch.compile.

A training step is what a training loop runs: the forward, cross-entropy
against fixed random labels, the backward, and an SGD step with momentum.
Nothing in it waits for a GPU; the timer synchronizes once per block of steps.

Precision (a config's dtype / param_dtype, as the layer benchmark names them):
float32; bfloat16/float32, the forward and loss under torch.autocast (how
models are trained in bfloat16: weights, batch-norm parameters and running
statistics stay float32, batch norm sees bfloat16 activations); bfloat16/
bfloat16, the model cast with model.to(torch.bfloat16). float16 needs a
GradScaler, whose own cost and synchronization this benchmark does not time.

Models: any torchvision classification model by name ("resnet50"), and timm's
as "timm:<name>" ("timm:efficientnet_b0"), untrained: nothing is downloaded.
Both packages are optional (pip install 'torch_safebn[models]')."""
from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import difflib
import functools
import importlib
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import torch_safebn
from torch_safebn import lowering

from .layer_bench import dtype_label
from .machine import machine_block, torch_threads
from .timing import Measurement, time_in_turns

__all__ = ["FORMAT", "IMPLS", "ROW_FIELDS", "VARIANTS", "Config", "NotInstalled", "configs", "create_model", "impls_for",
           "run"]

FORMAT = "torch_safebn.model/1"
VARIANTS = ("eager", "compile")
# converted-kernels: the converted model compiled with its fused ops kept whole for
# every batch norm, none lowered to ATen ops (torch_safebn/lowering.py), timed beside
# converted, whose compiled code keeps them only from a number of values per channel.
IMPLS = ("native", "converted", "converted-kernels")
LR, MOMENTUM = 0.01, 0.9  # the step's cost does not depend on them; small enough not to diverge on one batch
DEFAULT_MIN_RUN_TIME = 10.0  # timed seconds per implementation and config: steps take 0.01 to 10 s
MIN_RUNS_FOR_IQR = 4

_MEMORY_FORMAT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (input dtype, parameter dtype) a model can train in here; see the module docstring.
PRECISIONS = {
    (torch.float32, torch.float32): "float32",
    (torch.bfloat16, torch.float32): "bfloat16 activations under torch.autocast, float32 weights",
    (torch.bfloat16, torch.bfloat16): "bfloat16 throughout: model.to(torch.bfloat16)",
    (torch.float64, torch.float64): "float64",
}

ROW_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "torch_version": (str, "torch.__version__"),
    "device": (str, "CPU model (from /proc/cpuinfo) or GPU name"),
    "threads": (int, "torch threads the steps ran with"),
    "model": (str, "the model's name as given: torchvision's, or timm:<name>"),
    "batch_size": (int, "images per step"),
    "image_size": (int, "height and width of the images"),
    "impl": (str, "native (the model as built), converted (convert_model of a copy of it), or converted-kernels "
                  "(compile only: the converted model compiled with its fused ops kept for every batch norm, none "
                  "lowered to ATen ops)"),
    "variant": (str, "eager, or compile (torch.compile(model); compilation is not timed)"),
    "layout": (str, "the model's and the images' memory format: contiguous or channels_last"),
    "dtype": (str, "the activations' dtype: float32, bfloat16 or float64"),
    "param_dtype": (str, "the weights' dtype: float32 (bfloat16 activations: under torch.autocast) or as dtype"),
    "median_ms": (float, "median time of one training step, milliseconds"),
    "iqr_ms": ((float, type(None)), f"interquartile range over the timed blocks; null under {MIN_RUNS_FOR_IQR} blocks"),
    "runs": (int, "timed blocks behind the median (of one step or more each)"),
    "steps": (int, "timed steps, in all blocks"),
    "images_per_s": (float, "batch_size / median"),
    "first_step_s": (float, "the first step, untimed in the median: torch.compile's compilation, for compile"),
    "speedup_vs_native": (float, "native's median in the same variant, layout and dtypes / this median"),
    "speedup_vs_best_peer": (float, "the fastest native median in the same layout and dtypes, eager or compiled / this"),
}


class NotInstalled(ImportError):
    """An optional package a model needs is not installed; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Config:
    """How a model's training step runs; native and converted both run each config."""

    variant: str
    layout: str
    dtype: torch.dtype
    param_dtype: torch.dtype

    def label(self) -> str:
        return f"{self.variant} {self.layout} {dtype_label(_dtype_name(self.dtype), _dtype_name(self.param_dtype))}"

    @property
    def autocast(self) -> bool:
        return self.dtype != self.param_dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def configs(variants: Sequence[str], layouts: Sequence[str],
            dtypes: Sequence[tuple[torch.dtype, torch.dtype]]) -> list[Config]:
    """Every combination, variants outermost; ValueError names what is not offered."""
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    for layout in layouts:
        if layout not in _MEMORY_FORMAT:
            raise ValueError(f"unknown layout {layout!r} for a model: choose from {', '.join(_MEMORY_FORMAT)}")
    for dtype, param_dtype in dtypes:
        if (dtype, param_dtype) not in PRECISIONS:
            offered = ", ".join(dtype_label(_dtype_name(d), _dtype_name(p)) for d, p in PRECISIONS)
            why = " (float16 needs a GradScaler)" if torch.float16 in (dtype, param_dtype) else ""
            raise ValueError(f"a model trains here in {offered}, not "
                             f"{dtype_label(_dtype_name(dtype), _dtype_name(param_dtype))}{why}")
    return [Config(variant, layout, dtype, param_dtype)
            for variant in variants for layout in layouts for dtype, param_dtype in dtypes]


def impls_for(config: Config) -> tuple[str, ...]:
    """The implementations a config times: converted-kernels only differs from converted when compiled."""
    return IMPLS if config.variant == "compile" else IMPLS[:2]


# -- models ------------------------------------------------------------------------------------
def _optional(package: str, pin: str) -> object:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise NotInstalled(f"this model needs {package}, which is not installed: pip install 'torch_safebn[models]' "
                           f"(or pip install {pin})") from None


def create_model(name: str) -> nn.Module:
    """torchvision's classification model `name`, or timm's for "timm:<name>",
    untrained (nothing is downloaded), its weights drawn from seed 0 without
    touching the global generator. ValueError for a name neither knows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _create_model(name)


def _create_model(name: str) -> nn.Module:
    if name.startswith("timm:"):
        timm = _optional("timm", "timm==1.0.31")
        architecture = name.removeprefix("timm:")
        if not timm.is_model(architecture):
            raise ValueError(f"timm has no model {architecture!r}{_similar(architecture, timm.list_models())}")
        return timm.create_model(architecture, pretrained=False)
    torchvision = _optional("torchvision", "torchvision==0.29.1")
    names = torchvision.models.list_models(module=torchvision.models)  # the classification models only
    if name not in names:
        raise ValueError(f"torchvision has no classification model {name!r}{_similar(name, names)} "
                         "(timm's models are named timm:<name>)")
    return torchvision.models.get_model(name, weights=None)


def _similar(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=6)
    return f"; similar: {', '.join(close)}" if close else ""


def count_batch_norms(model: nn.Module) -> dict:
    """The batch norms of a converted model: how many, how many torch_safebn
    guards, and the classes of those left native (torch_safebn.report's rows)."""
    rows = torch_safebn.report(model).rows
    left_native = collections.Counter(row["class"] for row in rows if not row["guarded"])
    return {"total": len(rows), "guarded": len(rows) - left_native.total(), "left_native": dict(left_native)}


def compile_model(model: nn.Module) -> Callable:
    """What the compile variant runs: the model as most users compile it."""
    return torch.compile(model)


# -- steps -------------------------------------------------------------------------------------
def _with_fused_ops(step: Callable[[], None], device_type: str) -> Callable[[], None]:
    """step, compiled and run with the safebn ops kept whole on device_type
    for every batch norm."""
    def kept() -> None:
        with lowering.kernels_from(device_type, 0):
            step()

    return kept


def _training_step(model: nn.Module, config: Config, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One training step of model (as configured), on the same batch every time."""
    forward = compile_model(model) if config.variant == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step() -> None:
        with torch.autocast(images.device.type, dtype=config.dtype, enabled=config.autocast):
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _prepared(model: nn.Module, config: Config, device: torch.device) -> nn.Module:
    """A copy of model on the device, in the config's weight dtype and memory format, training."""
    model = copy.deepcopy(model).to(device=device, dtype=config.param_dtype)
    return model.to(memory_format=_MEMORY_FORMAT[config.layout]).train()


def _seconds_once(step: Callable[[], None], device: torch.device) -> float:
    """One call of step, timed whole (the GPU synchronized before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def _time_config(config: Config, models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                 threads: int, min_run_time: float, on_phase: Callable[[str], None] | None,
                 on_block: Callable[[int, float], None] | None) -> list[tuple[str, Measurement, float, int]]:
    """Per implementation (impls_for(config), in the order of models): its measurement, the
    seconds of its first step (a compilation included) and the steps timed."""
    if config.variant == "compile":
        torch._dynamo.reset()  # each config compiles afresh: no recompilation limit, no earlier graph
    batch = images.to(dtype=config.param_dtype, memory_format=_MEMORY_FORMAT[config.layout])
    steps, first = [], []
    impls = impls_for(config)
    for impl, model in zip(impls, models):
        if on_phase:
            on_phase(f"{config.label()}: {impl}, first step" + (" (compiling)" if config.variant == "compile" else ""))
        step = _training_step(_prepared(model, config, images.device), config, batch, labels)
        if impl == "converted-kernels":
            step = _with_fused_ops(step, images.device.type)
        first.append(_seconds_once(step, images.device))
        steps.append(step)
    if on_phase:
        on_phase(f"{config.label()}: timing")
    calls = [0] * len(steps)

    def count(i: int, block: Measurement) -> None:
        calls[i] += block.number_per_run
        if on_block:
            on_block(i, block.raw_times[0])

    measurements = time_in_turns(steps, threads, min_run_time, count)
    return list(zip(impls, measurements, first, calls))


# -- the run -----------------------------------------------------------------------------------
def run(
    name: str,
    native: nn.Module,
    plan: Sequence[Config],
    device: str | torch.device = "cpu",
    threads: int | None = None,
    batch_size: int = 32,
    image_size: int = 224,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    on_phase: Callable[[str], None] | None = None,
    on_timed: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Times a training step of the native model (create_model(name), or any
    image classifier) and of its converted copy (compiled, twice: see IMPLS),
    in turns, for each config of the plan; returns {"format", "created", "machine", "model", "settings",
    "rows"} (rows: ROW_FIELDS). on_phase(text) says what starts (a first step:
    a compilation; the timing); on_timed(config index, implementation index,
    seconds) follows each timed block."""
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    with torch_threads(threads):
        machine = machine_block(device, threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = torch_safebn.convert_model(copy.deepcopy(native))
        generator = torch.Generator(device).manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, device=device, generator=generator)
        with torch.no_grad():  # the number of classes, from a forward that updates nothing
            classes = copy.deepcopy(native).to(device).eval()(images[:1]).shape[-1]
        labels = torch.randint(0, classes, (batch_size,), device=device, generator=generator)
        timings = []
        for index, config in enumerate(plan):
            on_block = functools.partial(on_timed, index) if on_timed else None
            models = (native, converted, converted)
            timed = _time_config(config, models, images, labels, threads, min_run_time, on_phase, on_block)
            timings.append((config, timed))
    rows = _rows(name, timings, machine, batch_size, image_size)
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {
            "name": name,
            "class": type(native).__name__,
            "parameters": sum(p.numel() for p in native.parameters()),
            "batch_norms": count_batch_norms(converted),
            "convert_warnings": [str(w.message) for w in caught],
        },
        "settings": {
            "batch_size": batch_size, "image_size": image_size, "min_run_time_s": min_run_time,
            "step": f"forward, cross-entropy against fixed random labels, backward, SGD (lr={LR}, momentum={MOMENTUM})",
            "precisions": {dtype_label(_dtype_name(d), _dtype_name(p)): text for (d, p), text in PRECISIONS.items()},
        },
        "rows": rows,
    }


def _rows(name: str, timings: list, machine: dict, batch_size: int, image_size: int) -> list[dict]:
    """One row per implementation and config, with its speed-ups over native."""
    def precision(config: Config) -> tuple:
        return config.layout, config.dtype, config.param_dtype

    native = {config: m.median for config, timed in timings for impl, m, _, _ in timed if impl == "native"}
    rows = []
    for config, timed in timings:
        best_native = min(median for other, median in native.items() if precision(other) == precision(config))
        for impl, measurement, first_step, steps in timed:
            median, runs = measurement.median, len(measurement.times)
            rows.append({
                "torch_version": machine["torch_version"],
                "device": machine["device"],
                "threads": machine["threads"],
                "model": name,
                "batch_size": batch_size,
                "image_size": image_size,
                "impl": impl,
                "variant": config.variant,
                "layout": config.layout,
                "dtype": _dtype_name(config.dtype),
                "param_dtype": _dtype_name(config.param_dtype),
                "median_ms": median * 1e3,
                "iqr_ms": measurement.iqr * 1e3 if runs >= MIN_RUNS_FOR_IQR else None,
                "runs": runs,
                "steps": steps,
                "images_per_s": batch_size / median,
                "first_step_s": first_step,
                "speedup_vs_native": native[config] / median,
                "speedup_vs_best_peer": best_native / median,
            })
    return rows
