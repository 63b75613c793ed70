"""The forward under torch.func's transforms (vmap, grad, vjp, jvp, jacrev,
jacfwd, hessian, functional_call over stacked modules): native's batch norm,
for which every transform has its rules (batching, forward-mode and higher
derivatives), and the guard on the plain values beneath the transforms' wrappers.

In training with running statistics the call is native's, with native's
update and errors (vmap: unbatched running statistics with a batched input;
grad transforms: an in-place update of a captured buffer). Without them
(track_running_stats=False, or torch.func.replace_all_batch_norm_modules_)
the guard counts the batch and checks its statistics from the plain input,
except under vmap, where each example's statistics are its own. In eval the
check reads the plain running statistics, weight and bias; modules stacked
by torch.func.stack_module_state are checked model by model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import OPS
from .contract import values_per_channel
from .deployment import native_batch_norm

__all__ = ["active", "forward"]


def active() -> bool:
    """Whether a torch.func transform is running this call (about 40 ns)."""
    return torch._C._are_functorch_transforms_active()


def forward(bn: nn.Module, input: torch.Tensor, training: bool, running_mean, running_var,
            num_batches_tracked) -> torch.Tensor:
    """guarded_forward's call under the transforms (the activation, never
    fused here, is the caller's module)."""
    state, eps = bn.safety_state, bn.eps
    use_batch_stats = training or running_mean is None
    if use_batch_stats and bn.virtual_batch_size:
        raise NotImplementedError(f"{state.describe()}: a ghost batch norm (virtual_batch_size) has no form under "
                                  "torch.func's transforms in training; use it in eval mode, or without "
                                  "virtual_batch_size.")
    if use_batch_stats and running_mean is not None:
        return native_batch_norm(input, running_mean, running_var, bn.weight, bn.bias, num_batches_tracked, True,
                                 True, bn.momentum, eps)
    output = F.batch_norm(input, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, 0.0, eps)
    if bn.safety_counters is None or (use_batch_stats and _vmapping()):
        return output
    with torch._C._DisableFuncTorch():
        counters = _plain(bn.safety_counters)
        weight, bias = _plain(bn.weight), _plain(bn.bias)
        if use_batch_stats:
            x = _plain(input)
            mean, var = OPS.batch_stats(x)
            count = values_per_channel(x)
            single_sample = x.shape[0] == 1 and count > 1
            if single_sample and state.policy.on_single_sample != "ignore":
                state.single_sample(counters, x.shape)
            OPS.update_running_stats(None, None, None, counters, mean, torch.rsqrt(var + eps), weight, bias, count,
                                     eps, bn.momentum, single_sample)
            state.after_op(counters, x.shape, training=True)
            return output
        stats = (_plain(running_mean), _plain(running_var), weight, bias)
        for model, model_counters in enumerate(counters.view(-1, counters.shape[-1])):
            # one model's statistics: stacked ones (a leading dimension per model) by row
            mean, var, w, b = (None if t is None else t if t.dim() == 1 else t[model] for t in stats)
            OPS.check_running_stats(model_counters, mean, var, w, b, eps)
            state.after_op(model_counters, input.shape, training=False)
    return output


def _vmapping() -> bool:
    vmap = torch._C._functorch.TransformType.Vmap
    return any(i.key() == vmap for i in torch._C._functorch.get_interpreter_stack() or ())


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """The plain tensor beneath every transform's wrapper (and forward-mode
    AD's tangent), detached."""
    if t is None:
        return None
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t) or functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t.detach()
