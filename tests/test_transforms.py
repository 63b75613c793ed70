"""Every kind of derivative as native's: forward-mode AD (torch.func.jvp and
torch.autograd.forward_ad), vmap, vjp, jacrev, jacfwd and hessian, in train
and eval mode, with a fused activation, and frozen parameters; compared with
native and with finite differences in float64. None is silently zero: what
native refuses is refused with native's error."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import torch_safebn
from torch_safebn import NonFiniteError

OPS = torch.ops.safebn
TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def _pair(act: str | None = None, track_running_stats: bool = True, training: bool = False):
    """(native, converted) float64 batch norms over 3 channels with random affine parameters and
    running statistics; `act`: with an activation after it (timm's shape, fused when converted)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, track_running_stats=track_running_stats, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        if track_running_stats:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    native = nn.Sequential(bn, {"silu": nn.SiLU(), None: nn.Identity()}[act]).train(training)
    safe = torch_safebn.SafeBatchNormAct2d(3, act=act, track_running_stats=track_running_stats, dtype=torch.float64)
    safe.load_state_dict(bn.state_dict())
    return native, safe.train(training)


def _input(shape=(4, 3, 5, 5), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _finite_difference_jvp(f, x, t, h=1e-6):
    return (f(x + h * t) - f(x - h * t)) / (2 * h)


CASES = [  # (act, training, track_running_stats)
    (None, False, True),
    ("silu", False, True),
    (None, True, False),
    ("silu", True, False),
]
IDS = ["eval", "eval-silu", "train", "train-silu"]


@pytest.mark.parametrize("act,training,tracked", CASES, ids=IDS)
def test_jvp_matches_native_and_finite_differences(act, training, tracked):
    native, safe = _pair(act, tracked, training)
    x, t = _input(), _input(seed=2)
    expected = jvp(native, (x,), (t,))[1]
    out, tangent = jvp(safe, (x,), (t,))
    torch.testing.assert_close(out, native(x), **TIGHT)
    torch.testing.assert_close(tangent, expected, **TIGHT)
    torch.testing.assert_close(tangent, _finite_difference_jvp(native, x, t), atol=1e-6, rtol=1e-6)
    assert tangent.abs().max() > 0.1


@pytest.mark.parametrize("act,training", [(None, False), ("silu", False), (None, True), ("silu", True)],
                         ids=IDS)
def test_forward_ad_matches_native_with_running_statistics(act, training):
    """torch.autograd.forward_ad without torch.func: the ops' autograd computes the tangent (in
    training too, where the running statistics are updated as native's)."""
    native, safe = _pair(act, True, training)
    x, t = _input(), _input(seed=2)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(native(fwAD.make_dual(x, t))).tangent
        tangent = fwAD.unpack_dual(safe(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, expected, **TIGHT)
    torch.testing.assert_close(safe.running_var, native[0].running_var, **TIGHT)


def test_forward_ad_through_the_ops_with_an_activation():
    """The fused ops themselves: a dual input, weight or bias gives the composite formula's tangent."""
    x, t = _input(), _input(seed=2)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    tw = torch.randn(3, dtype=torch.float64)
    silu = int(torch_safebn.contract.Activation.SILU)

    def train(x, w):
        return OPS.forward_train(x, w, b, None, None, None, None, 0.1, 1e-5, silu, 0.0)[0]

    def evaluate(x, w):
        return OPS.batch_norm_eval(x, w, b, torch.zeros(3, dtype=torch.float64),
                                   torch.ones(3, dtype=torch.float64), None, 1e-5, silu, 0.0)

    for op in (train, evaluate):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(op(fwAD.make_dual(x, t), fwAD.make_dual(w, tw))).tangent
        h = 1e-6
        expected = (op(x + h * t, w + h * tw) - op(x - h * t, w - h * tw)) / (2 * h)
        torch.testing.assert_close(tangent, expected, atol=1e-6, rtol=1e-6)


def test_dual_running_statistics_raise_natives_error_in_eval():
    native, safe = _pair()
    x, t = _input(), _input(seed=2)
    for module in (native[0], safe):
        with fwAD.dual_level():
            module.running_mean = fwAD.make_dual(module.running_mean.detach(), torch.ones(3, dtype=torch.float64))
            with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
                module(fwAD.make_dual(x, t))


def test_vmap_per_example_eval_matches_native():
    native, safe = _pair("silu")
    xs = _input((6, 1, 3, 4, 4))
    torch.testing.assert_close(vmap(safe)(xs), vmap(native)(xs), **TIGHT)


def test_vmap_over_stacked_modules_matches_native():
    """An ensemble: stack_module_state + functional_call under vmap, batched running statistics."""
    natives, safes = zip(*(_pair() for _ in range(3)))
    for i, (native, safe) in enumerate(zip(natives, safes)):
        with torch.no_grad():
            native[0].running_mean.add_(i)
            safe.running_mean.add_(i)
    x = _input()

    def ensemble(models, base):
        params, buffers = stack_module_state(list(models))
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    torch.testing.assert_close(ensemble(safes, copy.deepcopy(safes[0])),
                               ensemble([n[0] for n in natives], copy.deepcopy(natives[0][0])), **TIGHT)


def test_vmap_in_training_as_native():
    """With running statistics native refuses (they would be updated in place from a batched
    input), and so does the converted module; without them (replace_all_batch_norm_modules_), both
    normalize each example's batch with its own statistics."""
    native, safe = _pair(training=True)
    xs = _input((5, 4, 3, 2, 2))
    for module in (native, safe):
        with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated in place"):
            vmap(module)(xs)
    for module in (native, safe):
        torch.func.replace_all_batch_norm_modules_(module)
    torch.testing.assert_close(vmap(safe)(xs), vmap(native)(xs), **TIGHT)


@pytest.mark.parametrize("act,training,tracked", CASES, ids=IDS)
def test_vjp_jacrev_jacfwd_hessian_with_frozen_parameters(act, training, tracked):
    native, safe = _pair(act, tracked, training)
    for module in (native, safe):
        module.requires_grad_(False)
    x, cotangent = _input((2, 3, 2, 2)), _input((2, 3, 2, 2), seed=3)
    torch.testing.assert_close(vjp(safe, x)[1](cotangent)[0], vjp(native, x)[1](cotangent)[0], **TIGHT)
    jacobian = jacrev(safe)(x)
    torch.testing.assert_close(jacobian, jacrev(native)(x), **TIGHT)
    torch.testing.assert_close(jacfwd(safe)(x), jacobian, **TIGHT)
    numeric = torch.autograd.functional.jacobian(lambda i: native(i), x)
    torch.testing.assert_close(jacobian, numeric, **TIGHT)

    def energy(module):
        return lambda i: module(i).square().sum()

    torch.testing.assert_close(hessian(energy(safe))(x), hessian(energy(native))(x), **TIGHT)


def test_grad_transforms_in_training_refuse_as_native():
    """Training with running statistics: native's update of a captured buffer is refused by
    torch.func, for native and converted modules alike, with the same error."""
    native, safe = _pair(training=True)
    x = _input((2, 3, 2, 2))
    errors = []
    for module in (native, safe):
        with pytest.raises(RuntimeError, match="mutate a captured Tensor") as raised:
            jacrev(module)(x)
        errors.append(type(raised.value))
    assert errors[0] is errors[1]


def test_the_eval_check_holds_under_vmap():
    _, safe = _pair()
    with torch.no_grad():
        safe.running_var[0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite or invalid statistics: variance in 1 channel"):
        vmap(safe)(_input((2, 1, 3, 2, 2)))
