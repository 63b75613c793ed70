"""The compiled path: what torch.compile traces in place of the fused safebn ops.

Compiled, a native batch norm is decomposed by inductor and fused with its
neighbours (the ReLU after it, the residual add, the squeeze-excitation's
mean, the next layer's reads), which an opaque op prevents. So while
compiling, a guarded batch norm is written as native's: aten.native_batch_norm,
which inductor decomposes, and the fused activation in ATen ops. The guard
stays an op of its own over the per-channel statistics
(safebn::update_running_stats, and in eval safebn::check_running_stats): it
writes the buffers and the counters in place, so they hold what the step
found when the observe op after it raises, as in eager code. A functional
guard would have its writes copied back only at the end of the graph, after
the raise, and lose them.

The guard's ops come before the normalization, not after it: an op with
effects between the normalization and the ops that read its output keeps
inductor from fusing them (in efficientnet_b0 the fused SiLU and the
squeeze-excitation's mean that reads it took a kernel and a pass over the
activation each). The statistics the guard reads are native_batch_norm's,
asked for first, which the compiler computes once.

Which calls are lowered is measured, not assumed. On the CPU, inductor's
channels-last code for a batch norm of many values per channel walks the
whole activation once per block of 8 channels in its reductions and writes the
activation's gradient out before reducing it, where the fused kernels read
each value once or twice; for few values per channel the two are within a few
percent. That decides for a batch norm with a fused activation (timm's
BatchNormAct2d): it keeps the fused ops from KERNELS_FROM_VALUES_PER_CHANNEL
of its device type on. A plain batch norm is lowered whatever its size: in
resnets inductor fuses it with the separate ReLU and the residual add, which
a kept op prevents, and that costs more than the kernels save. Change the
setting before compiling (dynamo reads it while tracing). torch.export keeps
the fused ops always (an exported program runs the kernels).
benchmarks/compiled_choice.py times both paths per shape; benchmarks/README.md
has the models' times behind the choice."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._ops import OPS
from .contract import accumulate_dtype, values_per_channel

__all__ = ["KERNELS_FROM_VALUES_PER_CHANNEL", "kernels_from", "lowers", "batch_norm_train", "batch_norm_eval"]

# Per device type, the values per channel from which a compiled batch norm
# with a fused activation keeps the fused kernels; 0 keeps them for every call,
# plain batch norms included, and so does a device type missing; math.inf
# lowers every call. CUDA's is unmeasured (no GPU was at hand): lowered, as
# native's batch norm is there.
KERNELS_FROM_VALUES_PER_CHANNEL = {"cpu": 4096, "cuda": math.inf}


@contextlib.contextmanager
def kernels_from(device_type: str, values: float) -> Iterator[None]:
    """KERNELS_FROM_VALUES_PER_CHANNEL[device_type] = values inside the block.
    Wrap every call of a compiled function in it, not only the compiling one:
    dynamo guards on the setting, so a call finds the compilation made under
    the same value."""
    was = KERNELS_FROM_VALUES_PER_CHANNEL.get(device_type)
    KERNELS_FROM_VALUES_PER_CHANNEL[device_type] = values
    try:
        yield
    finally:
        if was is None:
            del KERNELS_FROM_VALUES_PER_CHANNEL[device_type]
        else:
            KERNELS_FROM_VALUES_PER_CHANNEL[device_type] = was


def lowers(input: torch.Tensor, activation: int) -> bool:
    """Whether this call, being compiled, is written in ATen ops."""
    if torch.compiler.is_exporting():
        return False
    threshold = KERNELS_FROM_VALUES_PER_CHANNEL.get(input.device.type, 0)
    if threshold <= 0:
        return False
    if not activation or math.isinf(threshold):
        return True
    # Only a size known while tracing keeps the kernels: a guard on a dynamic
    # batch's size would compile once per side of the threshold.
    return not statically_known_true(values_per_channel(input) >= threshold)


def batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, counters, momentum, eps,
                     activation=0, activation_param=0.0, *, observe=None):
    """safebn::batch_norm_train's result and effects, in ATen ops; observe(),
    the guard's host action, between the guard and the normalization."""
    acc = accumulate_dtype(input.dtype)
    with torch.no_grad():
        if input.dtype == acc:
            # The statistics of the normalization below (without weight and bias,
            # its output unused): the compiler computes them once.
            _, mean, invstd = torch.native_batch_norm(input, None, None, None, None, True, 0.0, eps)
        else:
            # In acc's precision, as the eager op keeps them: on the CPU, inductor's
            # decomposition rounds native_batch_norm's to the input's dtype.
            var, mean = torch.var_mean(input.to(acc), [0, *range(2, input.dim())], correction=0)
            invstd = torch.rsqrt(var + eps)
        count = values_per_channel(input)
        OPS.update_running_stats.default(
            running_mean, running_var, num_batches_tracked, counters, mean, invstd, _detached(weight),
            _detached(bias), count, eps, momentum, single_sample=input.shape[0] == 1 and count > 1)
    if observe is not None:
        observe()
    output = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)[0]
    return OPS.activation.default(output, activation, activation_param) if activation else output


def batch_norm_eval(input, weight, bias, running_mean, running_var, counters, eps, activation=0,
                    activation_param=0.0, *, observe=None):
    """safebn::batch_norm_eval's result and effects, in ATen ops; observe() as
    batch_norm_train's."""
    if counters is not None:
        with torch.no_grad():
            OPS.check_running_stats.default(counters, running_mean, running_var, _detached(weight), _detached(bias),
                                            eps)
    if observe is not None:
        observe()
    output = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    return OPS.activation.default(output, activation, activation_param) if activation else output


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
