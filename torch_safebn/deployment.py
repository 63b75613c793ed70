"""Deployment artifacts are plain PyTorch. In eval mode a batch norm is a
per-channel affine map, and an artifact made for inference (a
torch.jit.trace, an ONNX export with either exporter, an eval-mode
torch.export, a torch.jit.script) holds native's ops, so that it loads and
runs without torch_safebn. Its safety is checked once, when it is made:
every running statistic finite and running_var + eps > 0, and a finite
weight and bias, else an error naming the layer.

A training-mode torch.export keeps the guarded ops, which update the
buffers as the module does; a training-mode trace or ONNX export records
native's training forward, unguarded, as it would for nn.BatchNorm."""
# No postponed annotations: TorchScript compiles native_batch_norm, the
# scripted modules' forward, from its annotations.
from typing import Optional

import torch
from torch import nn

from .errors import NonFiniteError

__all__ = ["making_artifact", "forward", "check_artifact"]


def making_artifact() -> bool:
    """Whether this call is being recorded into an artifact that must hold
    standard ops only: a TorchScript trace, an ONNX export (either exporter),
    or a torch.export of an eval-mode module (decided in forward())."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def forward(bn: nn.Module, input: torch.Tensor, training: bool) -> torch.Tensor:
    """The call as native's module computes it, for the artifact being made.
    A training-mode torch.export keeps the guarded ops instead."""
    exporting_ops = torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export()
    if exporting_ops and training:
        return _guarded_export(bn, input)
    if training and bn.virtual_batch_size:
        raise NotImplementedError(f"{bn.safety_state.describe()}: a ghost batch norm (virtual_batch_size) has no "
                                  "native training form to record; make the artifact in eval mode (model.eval()).")
    check_artifact(bn)
    return native_forward(bn, input, training)


def _guarded_export(bn: nn.Module, input: torch.Tensor) -> torch.Tensor:
    from .functional import _TRAIN

    running = (bn.running_mean, bn.running_var, bn.num_batches_tracked) if bn.track_running_stats else (None,) * 3
    return _TRAIN(input, bn.weight, bn.bias, *running, bn.safety_counters, bn.momentum, bn.eps, 0, 0.0,
                  bn.virtual_batch_size or 0)


def native_forward(bn: nn.Module, input: torch.Tensor, training: bool) -> torch.Tensor:
    return native_batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.num_batches_tracked,
                             training, bn.track_running_stats, bn.momentum, bn.eps)


def native_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      num_batches_tracked: Optional[torch.Tensor], training: bool, track_running_stats: bool,
                      momentum: Optional[float], eps: float) -> torch.Tensor:
    """nn.BatchNorm's forward: in training the batch's statistics and, when
    tracked, the running statistics updated (momentum=None: a cumulative
    average over num_batches_tracked); else the running statistics. What a
    scripted module runs (TorchScript compiles it), and an artifact records."""
    factor = 0.0 if momentum is None else momentum
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    use_batch_stats = training or running_mean is None
    if use_batch_stats and not track_running_stats:
        running_mean = None
        running_var = None
    return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, factor,
                                          eps)


def check_artifact(bn: nn.Module, purpose: str = "make a deployment artifact (trace, ONNX, export or script) of it"
                   ) -> None:
    """Raises NonFiniteError, naming the layer, if the statistics or
    parameters an artifact would bake in are unsafe: any NaN/Inf, or
    running_var + eps <= 0. Reads the module's real values (an export
    traces with fake ones)."""
    state = bn.safety_state
    if not state.policy.checks:
        return
    found = []
    values = {name: _real(getattr(bn, name)) for name in ("running_mean", "running_var", "weight", "bias")}
    # computed on the real values, outside the tracer's modes (which would record these ops)
    with torch.utils._python_dispatch._disable_current_modes():
        for name, value in values.items():
            if value is None or nn.parameter.is_lazy(value):  # a lazy module's, before its first input
                continue
            bad = ~torch.isfinite(value)
            if name == "running_var":
                bad |= value.double() + bn.eps <= 0
            channels = int(bad.sum())
            if channels:
                found.append(f"{name} in {channels} channel{'s' if channels != 1 else ''}")
    if found:
        raise NonFiniteError(
            f"{state.describe()}: cannot {purpose}: {', '.join(found)} {'are' if len(found) > 1 else 'is'} NaN/Inf "
            "(a variance also when running_var + eps <= 0), which native batch norm would use unguarded. Reload "
            "the running statistics from a good checkpoint or recompute them (torch_safebn.recalibrate), then try "
            "again."
        )


def _real(t: torch.Tensor | None) -> torch.Tensor | None:
    """The real tensor behind `t`: `t` itself, or for a fake tensor that
    torch.export made of a real one (it traces with fakes), that one, found
    in the fake mode's memo of the tensors it converted."""
    if t is None or not isinstance(t, torch._subclasses.FakeTensor):
        return t
    converter = t.fake_mode.fake_tensor_converter
    for real, tensor_id in converter.meta_converter.describer.lookup_tensor.items():
        if converter.tensor_memo.get(tensor_id) is t:
            return real
    raise RuntimeError(
        "torch_safebn could not find the values of a batch norm's statistics while exporting, to check them "
        "once for the artifact: export the model after torch_safebn.revert_model(model), which checks them.")
