"""The batch norm with a fused activation (issue 14): the activation codes
against csrc/activation.h, SafeBatchNormAct2d against nn.BatchNorm2d followed
by the native activation (numbers, gradients, buffers, and that the fused
path is the one taken), bfloat16 against native's own error, first and second
derivatives, opcheck of the ops with an activation, the unfused fallback, the
safety guard with an activation, the errors, and timm interop."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import torch_safebn
from conftest import LAYOUTS, TOLERANCE, assert_close, make_input
from torch_safebn import NonFiniteError, SafeBatchNorm2d, SafeBatchNormAct2d, SafeSyncBatchNormAct, batch_norm_act
from torch_safebn import reference
from torch_safebn.activations import activation_module, fused_activation
from torch_safebn.contract import NUM_COUNTERS, Activation, Counter

OPS = torch.ops.safebn

# name: (a factory of the native module, its code, its parameter). LeakyReLU's slope is not
# the default, so that a parameter lost on the way reads as a wrong number.
ACTIVATIONS = {
    "relu": (nn.ReLU, Activation.RELU, 0.0),
    "relu6": (nn.ReLU6, Activation.RELU6, 0.0),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), Activation.LEAKY_RELU, 0.2),
    "silu": (nn.SiLU, Activation.SILU, 0.0),
    "gelu": (nn.GELU, Activation.GELU, 0.0),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), Activation.GELU_TANH, 0.0),
    "hardswish": (nn.Hardswish, Activation.HARDSWISH, 0.0),
}
# Where each activation's derivative jumps, and the pieces between.
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0)}
SHAPE = (4, 5, 3, 4)
# An input for each of the CPU kernels' walks (batch_norm_cpu.cpp, plan_for), at any thread
# count: the backward of silu and gelu writes dz in each walk's own way (stores_activation_grad).
WALKS = {
    "planes": ((2, 3, 24, 24), "contiguous"),  # a channel per task, reduced then written
    "plane-slices": ((4, 1, 64, 64), "contiguous"),  # one channel in four slices
    "rows": ((3, 5, 10, 12), "contiguous"),  # reductions over (n, c) rows of 120 values
    "blocks": (SHAPE, "contiguous"),  # rows of one example's C * S values
    "channels-last": ((3, 70, 5, 7), "channels_last"),  # rows of 4 pixels, and one left over
}
# Runs longer than kernel_impl.h's kCachedValues (dz written in pieces), a channel per task up to
# 4 threads. Not in float32 parity: over a million values some reach z where native's float32
# gelu_tanh' rounds to 0 (z = -5.6: native 0, float64 -6.9e-7), past the parity test's atol.
ALL_WALKS = {**WALKS, "long-runs": ((1, 16, 257, 256), "contiguous")}
PARITY_CASES = [(dtype, walk) for dtype in (torch.float32, torch.float64) for walk in WALKS]
PARITY_CASES.append((torch.float64, "long-runs"))


def _pieces_hit(z: torch.Tensor, name: str) -> bool:
    """Whether z has values on every piece of the activation (e.g. relu6: below 0, between
    0 and 6, above 6), so that a wrong branch shows in the numbers."""
    edges = (-math.inf, *KINKS.get(name, ()), math.inf)
    return all(((z > lo) & (z < hi)).any() for lo, hi in zip(edges, edges[1:]))


def _distance_to_kinks(z: torch.Tensor, name: str) -> float:
    kinks = KINKS.get(name, ())
    return min(((z - k).abs().min().item() for k in kinks), default=math.inf)


def _affine(C, dtype, seed=0, scale=3.0):
    """Weight and bias wide enough (|weight| up to 4.5) that z = bn(x) reaches every piece of
    relu6 and hardswish, not only the middle one."""
    g = torch.Generator().manual_seed(seed)
    weight = ((torch.rand(C, generator=g, dtype=torch.float64) + 0.5) * scale).to(dtype)
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    return weight, bias


def _native_and_fused(name, dtype, param_dtype=None, seed=0, channels=SHAPE[1]):
    """nn.BatchNorm2d with random affine parameters, its activation, and the SafeBatchNormAct2d
    holding the same state."""
    factory, _, _ = ACTIVATIONS[name]
    param_dtype = param_dtype or dtype
    native = nn.BatchNorm2d(channels, dtype=param_dtype)
    weight, bias = _affine(channels, param_dtype, seed)
    with torch.no_grad():
        native.weight.copy_(weight)
        native.bias.copy_(bias)
    fused = SafeBatchNormAct2d(channels, dtype=param_dtype, act=factory())
    fused.load_state_dict(native.state_dict())
    return native, factory(), fused


def _schema_arguments(func, args, kwargs):
    """A call's arguments by name, defaults filled in (the dispatcher drops trailing defaults)."""
    values = {}
    for i, argument in enumerate(func._schema.arguments):
        if i < len(args):
            values[argument.name] = args[i]
        elif argument.name in (kwargs or {}):
            values[argument.name] = kwargs[argument.name]
        else:
            values[argument.name] = argument.default_value
    return values


class _OpsCalled(TorchDispatchMode):
    """Records every op that reaches the dispatcher, with the safebn ops' activation arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "safebn":
            values = _schema_arguments(func, args, kwargs)
            self.ops.append((func._schema.name, values.get("activation"), values.get("activation_param")))
        else:
            self.ops.append((str(func), None, None))
        return func(*args, **(kwargs or {}))

    def safebn(self):
        return [op for op in self.ops if op[0].startswith("safebn::")]


# -- the codes ------------------------------------------------------------------------------------
def test_the_ops_refuse_the_code_after_the_last():
    """The kernels' range of codes ends where Activation does (kCount == len(Activation))."""
    x = make_input((4, 3))
    OPS.forward_train(x, None, None, None, None, None, None, 0.1, 1e-5, len(Activation) - 1, 0.0)
    for code in (len(Activation), -1):
        with pytest.raises(ValueError, match=rf"activation must be a code of .*\(0 to {len(Activation) - 1}\), got {code}"):
            OPS.forward_train(x, None, None, None, None, None, None, 0.1, 1e-5, code, 0.0)


@pytest.mark.parametrize("kind", list(Activation), ids=lambda a: a.name.lower())
def test_each_code_computes_its_activation(kind):
    """The code's numbers, op by op: forward_train and batch_norm_eval write act(bn(x)) with act
    reference_activation's (torch's functional form) for that code, float64."""
    x = make_input((6, 3, 4), torch.float64)
    weight, bias = _affine(3, torch.float64)
    param = 0.3 if kind == Activation.LEAKY_RELU else 0.0
    y, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, 0.1, 1e-5, int(kind), param)
    z = F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    torch.testing.assert_close(y, reference.activation(z, kind, param), atol=1e-10, rtol=1e-10)
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    y = OPS.batch_norm_eval(x, weight, bias, running_mean, running_var, None, 1e-5, int(kind), param)
    z = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)
    torch.testing.assert_close(y, reference.activation(z, kind, param), atol=1e-10, rtol=1e-10)


# -- parity with nn.BatchNorm2d followed by the activation ----------------------------------------
@pytest.mark.parametrize("dtype,walk", PARITY_CASES, ids=[f"{str(d)[6:]}-{w}" for d, w in PARITY_CASES])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_parity_with_batch_norm_then_the_native_activation(name, dtype, walk):
    """Training: the output, every gradient and every buffer as nn.BatchNorm2d then the activation
    (conftest's TOLERANCE: summation order only); eval: the output and the input gradient. The
    data reach every piece of the activation; the output keeps the input's layout. In every walk
    of the CPU kernels."""
    shape, layout = ALL_WALKS[walk]
    native, act, fused = _native_and_fused(name, dtype, channels=shape[1])
    x = make_input(shape, dtype, layout)
    dy = make_input(shape, dtype, layout, seed=7)
    for training in (True, False):
        native.train(training), fused.train(training)
        x_native, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        z = native(x_native)
        assert _pieces_hit(z.detach(), name), "the data miss a piece of the activation"
        expected = act(z)
        got = fused(x_fused)
        assert got.is_contiguous(memory_format=LAYOUTS[layout])
        assert_close(got, expected, dtype, f"{name} output (training={training})")
        expected.backward(dy)
        got.backward(dy)
        assert_close(x_fused.grad, x_native.grad, dtype, f"{name} input grad (training={training})")
        for p in ("weight", "bias"):
            assert_close(getattr(fused, p).grad, getattr(native, p).grad, dtype, f"{name} {p} grad")
            getattr(fused, p).grad = getattr(native, p).grad = None
        for b in ("running_mean", "running_var"):
            assert_close(getattr(fused, b), getattr(native, b), dtype, f"{name} {b}")
        assert fused.num_batches_tracked.item() == native.num_batches_tracked.item() == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_the_fused_path_is_the_one_taken(name, training):
    """fused_activation knows the native module; the forward is the one safebn op with that code
    and parameter (no activation op of its own), and the backward the one safebn::backward with
    them (the activation's derivative applied inside)."""
    factory, code, param = ACTIVATIONS[name]
    assert fused_activation(factory()) == (code, param)
    fused = SafeBatchNormAct2d(3, act=factory()).train(training)
    x = make_input((2, 3, 4, 4)).requires_grad_()
    with _OpsCalled() as called:
        y = fused(x)
    forward_op = "safebn::forward_train" if training else "safebn::batch_norm_eval"
    assert called.ops == [(forward_op, int(code), param)]
    with _OpsCalled() as called:
        y.backward(torch.ones_like(y))
    assert called.safebn() == [("safebn::backward", int(code), param)]


def test_a_changed_leaky_relu_slope_is_read_at_the_next_forward():
    """The slope is read per call (fused_activation's docstring): setting negative_slope on the
    module's act changes the next forward, as it would the native module."""
    fused = SafeBatchNormAct2d(3, act="leaky_relu")
    assert fused.act.negative_slope == 0.01  # nn.LeakyReLU's default for the name
    fused.act.negative_slope = 0.3
    x = make_input((4, 3, 2, 2))
    with _OpsCalled() as called:
        y = fused(x)
    assert called.safebn() == [("safebn::forward_train", int(Activation.LEAKY_RELU), 0.3)]
    expected = F.leaky_relu(F.batch_norm(x, None, None, training=True), 0.3)
    assert_close(y, expected, torch.float32, "leaky_relu with the changed slope")


def test_activation_module_accepts_names_modules_and_classes():
    """act: a name (any case, with the aliases swish and hard_swish), None, a module (kept as
    is) or a module class (instantiated)."""
    assert type(activation_module(None)) is nn.Identity
    for name in ("ReLU", "swish", "hard_swish", "GELU_tanh"):
        assert fused_activation(activation_module(name)) is not None, name
    assert fused_activation(activation_module("swish")) == (Activation.SILU, 0.0)
    assert fused_activation(activation_module("hard_swish")) == (Activation.HARDSWISH, 0.0)
    assert fused_activation(activation_module("gelu_tanh")) == (Activation.GELU_TANH, 0.0)
    assert fused_activation(activation_module("leaky_relu", 0.25)) == (Activation.LEAKY_RELU, 0.25)
    module = nn.SiLU()
    assert activation_module(module) is module
    assert type(activation_module(nn.ReLU6)) is nn.ReLU6
    assert type(SafeBatchNormAct2d(3).act) is nn.ReLU, "timm's default activation"


# -- bfloat16 against float64 ------------------------------------------------------------------------
def _max_error(actual, expected):
    return (actual.double() - expected).abs().max().item()


def _ulp(value: float) -> float:
    """One bfloat16 ulp at `value` (8 significant bits)."""
    return 2.0 ** (math.frexp(value)[1] - 8)


@pytest.mark.parametrize("walk", ["bfloat16-pairs", *ALL_WALKS])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_bfloat16_is_as_accurate_as_native(name, walk):
    """bfloat16 input, float32 parameters: the fused output and input gradient are no further
    from act(bn(x)) computed in float64 on the same input than twice native BatchNorm2d + act's
    own error plus one bfloat16 ulp of the values' scale, in training and in eval; in every walk,
    and with an even row length, which the kernels read as pairs of bfloat16."""
    shape, layout = ALL_WALKS.get(walk, ((8, 5, 6, 6), "contiguous"))
    native, act, fused = _native_and_fused(name, torch.bfloat16, param_dtype=torch.float32, channels=shape[1])
    x = make_input(shape, torch.bfloat16, layout)
    dy = make_input(shape, torch.bfloat16, layout, seed=7)
    weight, bias = native.weight.detach().double(), native.bias.detach().double()
    _, code, param = ACTIVATIONS[name]
    for training in (True, False):
        native.train(training), fused.train(training)
        running = (native.running_mean.double(), native.running_var.double())  # before the step
        x64 = x.double().requires_grad_()
        reference_out = reference.activation(F.batch_norm(x64, *running, weight, bias, training, 0.0, 1e-5), code,
                                             param)
        (reference_grad,) = torch.autograd.grad(reference_out, x64, dy.double())
        results = {}
        for label, module in (("native", lambda t: act(native(t))), ("fused", fused)):
            xb = x.clone().requires_grad_()
            y = module(xb)
            y.backward(dy)
            assert y.dtype == xb.grad.dtype == torch.bfloat16
            results[label] = (_max_error(y, reference_out), _max_error(xb.grad, reference_grad))
        for i, (what, ref) in enumerate((("output", reference_out), ("input grad", reference_grad))):
            allowed = 2 * results["native"][i] + _ulp(ref.abs().max().item())
            assert results["fused"][i] <= allowed, (
                f"{name} {what} (training={training}): error {results['fused'][i]:.3g}, native's "
                f"{results['native'][i]:.3g}, allowed {allowed:.3g}")


# -- first and second derivatives ------------------------------------------------------------------
def _gradcheck_inputs(name, training, shape=(3, 4, 2, 3)):
    """float64 x, weight, bias and running statistics whose z = bn(x) has values on every piece
    of the activation and none within 1e-3 of a kink, where the derivative jumps and finite
    differences (step 1e-6) would disagree with any one-sided derivative. The first seed that
    gives such data."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        weight, bias = _affine(shape[1], torch.float64, seed=seed)
        running_mean = torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5
        running_var = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
        z = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.0, 1e-3)
        if _pieces_hit(z, name) and _distance_to_kinks(z, name) > 1e-3:
            return x, weight, bias, running_mean, running_var
    raise AssertionError(f"no seed gives gradcheck data for {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradcheck_and_gradgradcheck(name, training):
    """First and second derivatives of batch_norm_act with respect to input, weight and bias,
    against finite differences, float64 (leaky_relu with slope 0.2)."""
    x, weight, bias, running_mean, running_var = _gradcheck_inputs(name, training)

    def f(x, weight, bias):
        # the running statistics are cloned: a training step updates them
        return batch_norm_act(x, running_mean.clone(), running_var.clone(), weight, bias, training=training,
                              momentum=0.1, eps=1e-3, act=name, negative_slope=0.2)

    args = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_gradcheck_and_gradgradcheck(training):
    """The same through SafeBatchNormAct2d, its parameters swapped in by functional_call, with a
    module's parameter (LeakyReLU's slope) travelling to the ops."""
    x, weight, bias, running_mean, running_var = _gradcheck_inputs("leaky_relu", training)
    module = SafeBatchNormAct2d(4, eps=1e-3, act=nn.LeakyReLU(0.2), dtype=torch.float64).train(training)
    with torch.no_grad():
        module.running_mean.copy_(running_mean), module.running_var.copy_(running_var)

    def f(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    args = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_second_derivative_matches_native(name):
    """The double backward gives native's numbers (nn.BatchNorm2d then the activation), not
    only self-consistent ones."""
    factory, _, _ = ACTIVATIONS[name]
    x, weight, bias, _, _ = _gradcheck_inputs(name, True)
    native = nn.BatchNorm2d(4, eps=1e-3, dtype=torch.float64)
    fused = SafeBatchNormAct2d(4, eps=1e-3, act=factory(), dtype=torch.float64)
    for module in (native, fused):
        with torch.no_grad():
            module.weight.copy_(weight), module.bias.copy_(bias)
    results = []
    for forward in (lambda t: factory()(native(t)), fused):
        xi = x.clone().requires_grad_()
        y = forward(xi)
        (gx,) = torch.autograd.grad((y ** 3).sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad((gx ** 2).sum(), xi)
        results.append((gx.detach(), ggx))
    torch.testing.assert_close(results[1], results[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", [
    "relu", "relu6", "leaky_relu",
    "hardswish",
])
def test_derivatives_at_the_kinks_are_torchs(name):
    """At z exactly on a kink the fused backward and reference_derivative take the installed
    torch's one-sided values (e.g. relu'(0) = 0, relu6' = 0 at 0 and 6, leaky_relu'(0) = slope),
    as csrc/activation.h promises; the forward is torch's there too. Eval with running_var + eps
    = 1, weight 1, bias 0, so that z = x exactly; points off the kinks as well."""
    factory, code, param = ACTIVATIONS[name]
    z = torch.tensor([[-3.0, 0.0, 3.0, 6.0, -1.0, 7.0, -3.5, 2.5]], dtype=torch.float64).T  # [N = 8, C = 1]
    running_mean, running_var = torch.zeros(1, dtype=torch.float64), torch.full((1,), 0.75, dtype=torch.float64)
    ones, zeros = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    zt = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(factory()(zt).sum(), zt)
    exact = dict(atol=0, rtol=1e-15)  # the kinks' values are 0, 1, the slope or 1/2: exact
    y = OPS.batch_norm_eval(z, ones, zeros, running_mean, running_var, None, 0.25, int(code), param)
    torch.testing.assert_close(y, factory()(z), **exact)
    invstd = torch.rsqrt(running_var + 0.25)
    grad_input = OPS.backward(torch.ones_like(z), z, ones, zeros, running_mean, invstd, False,
                              [True, False, False], int(code), param)[0]
    torch.testing.assert_close(grad_input, expected, **exact, msg=lambda m: f"fused backward: {m}")
    torch.testing.assert_close(reference.activation_derivative(z, code, param), expected, **exact,
                               msg=lambda m: f"reference_derivative: {m}")


@pytest.mark.parametrize("kind", list(Activation), ids=lambda a: a.name.lower())
def test_compiled_and_reference_backward_agree(kind):
    """The compiled backward with an activation gives the pure-PyTorch fallback's numbers
    (reference.py, what runs when the extension does not load), training and eval, float64."""
    x = make_input((6, 3, 4), torch.float64)
    dy = make_input((6, 3, 4), torch.float64, seed=7)
    weight, bias = _affine(3, torch.float64)
    param = 0.3 if kind == Activation.LEAKY_RELU else 0.0
    _, mean, invstd = OPS.forward_train(x, weight, bias, None, None, None, None, 0.1, 1e-5, int(kind), param)
    for train in (True, False):
        args = (dy, x, weight, bias, mean, invstd, train, [True, True, True], int(kind), param)
        for got, want in zip(OPS.backward(*args), reference.backward(*args)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# -- opcheck --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_opcheck_with_an_activation(name):
    """Schema, fake kernel and autograd registration of every op that takes an activation, called
    with a non-zero code (leaky_relu with a non-default slope)."""
    _, code, param = ACTIVATIONS[name]
    shape, C, eps = (4, 6, 5, 3), 6, 1e-5
    x = make_input(shape, layout="channels_last").requires_grad_()
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    mean, var = OPS.batch_stats(x.detach())
    invstd = torch.rsqrt(var + eps)
    grad = make_input(shape, layout="channels_last", seed=7)

    def buffers():
        return torch.zeros(C), torch.ones(C), torch.tensor(0), torch.zeros(NUM_COUNTERS, dtype=torch.int64)

    act = (int(code), param)
    calls = [
        (OPS.forward_train.default, (x, w, b, *buffers(), 0.1, eps, *act)),
        (OPS.batch_norm_train.default, (x, w, b, *buffers(), 0.1, eps, *act)),
        (OPS.batch_norm_eval.default, (x, w, b, mean, var, torch.zeros(NUM_COUNTERS, dtype=torch.int64), eps, *act)),
        (OPS.backward.default, (grad, x.detach(), w.detach(), b.detach(), mean, invstd, True, [True, True, True],
                                *act)),
        (OPS.backward.default, (grad, x.detach(), w.detach(), b.detach(), mean, invstd, False, [True, False, True],
                                *act)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


# -- the unfused fallback -----------------------------------------------------------------------------
class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _ShiftedReLU(nn.ReLU):
    """A subclass of a fusable type that computes something else: it must not be fused."""

    def forward(self, x):
        return super().forward(x) - 0.5


# name: (act factory, drop factory, eval-mode dropout), each unfusable for its own reason.
UNFUSED = {
    "mish": (nn.Mish, None),
    "tanh": (nn.Tanh, None),
    "lambda_module": (lambda: _Lambda(lambda t: t * torch.sigmoid(1.5 * t)), None),
    "relu_subclass": (_ShiftedReLU, None),
    "relu_after_dropout_p0": (nn.ReLU, lambda: nn.Dropout(p=0.0)),
    "gelu_after_dropout": (nn.GELU, lambda: nn.Dropout(p=0.5)),  # the same mask from the same seed
}


@pytest.mark.parametrize("case", list(UNFUSED))
def test_unfused_activations_and_drops_run_as_batch_norm_then_drop_then_act(case):
    """An activation without a kernel, or a drop that is not an identity, runs as its own module
    after the batch norm: the numbers, gradients and buffers of nn.BatchNorm2d, then drop, then
    act, in training and eval, and the op is called without an activation."""
    act_factory, drop_factory = UNFUSED[case]
    native = nn.BatchNorm2d(SHAPE[1])
    weight, bias = _affine(SHAPE[1], torch.float32)
    with torch.no_grad():
        native.weight.copy_(weight), native.bias.copy_(bias)
    act, drop = act_factory(), drop_factory() if drop_factory else nn.Identity()
    fused = SafeBatchNormAct2d(SHAPE[1], act=act_factory(), drop=drop_factory() if drop_factory else None)
    fused.load_state_dict(native.state_dict())
    x = make_input(SHAPE)
    dy = make_input(SHAPE, seed=7)
    for training in (True, False):
        for m in (native, drop, fused):
            m.train(training)
        x_native, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(1)
        expected = act(drop(native(x_native)))
        torch.manual_seed(1)
        with _OpsCalled() as called:
            got = fused(x_fused)
        assert [op[1:] for op in called.safebn()] == [(0, 0.0)], "the activation went into the op"
        assert_close(got, expected, torch.float32, f"{case} output (training={training})")
        expected.backward(dy)
        got.backward(dy)
        assert_close(x_fused.grad, x_native.grad, torch.float32, f"{case} input grad (training={training})")
        for p in ("weight", "bias"):
            assert_close(getattr(fused, p).grad, getattr(native, p).grad, torch.float32, f"{case} {p} grad")
            getattr(fused, p).grad = getattr(native, p).grad = None
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(fused, b), getattr(native, b), torch.float32, f"{case} {b}")


def test_unfusable_modules_are_not_fused():
    """fused_activation says None for what has no kernel: other activations, a subclass of a
    fusable type (it may compute something else), a LeakyReLU subclass included."""
    for module in (nn.Mish(), nn.Tanh(), nn.PReLU(), nn.ELU(), _ShiftedReLU(), _Lambda(torch.relu),
                   type("MyLeaky", (nn.LeakyReLU,), {})()):
        assert fused_activation(module) is None, module


def test_safe_sync_batch_norm_act_without_a_process_group_is_batch_norm_then_act():
    """SafeSyncBatchNormAct (its activation never fused) outside distributed training: the
    numbers of nn.BatchNorm2d then drop then act."""
    native = nn.BatchNorm2d(SHAPE[1])
    sync = SafeSyncBatchNormAct(SHAPE[1], act="silu")
    sync.load_state_dict(native.state_dict())
    x = make_input(SHAPE)
    assert_close(sync(x), F.silu(native(x)), torch.float32, "SafeSyncBatchNormAct")
    assert_close(sync.running_var, native.running_var, torch.float32, "running_var")


# -- the safety guard with an activation ------------------------------------------------------------
def _poisoned(shape=(4, 3, 2, 2), value=float("nan")):
    x = make_input(shape)
    x[0, 1, 0, 0] = value
    return x


def _buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "tracked" in k}


def _counters(module):
    return dict(zip((c.name.lower() for c in Counter), module.safety_counters.tolist()))


@pytest.mark.parametrize("act", ["relu", "silu", "mish"])
def test_nonfinite_skip_with_an_activation_keeps_the_buffers_and_counts(act):
    """on_nonfinite='skip': a NaN in the input leaves the running statistics as they were, counts
    a skipped update and a non-finite event (report() shows them), exactly as the plain
    SafeBatchNorm2d does with the same batches; fused or not."""
    fused = SafeBatchNormAct2d(3, act=act if act != "mish" else nn.Mish(), on_nonfinite="skip")
    plain = SafeBatchNorm2d(3, on_nonfinite="skip")
    model = nn.Sequential(fused)
    for module in (fused, plain):
        module(make_input((4, 3, 2, 2)))
        before = _buffers(module)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 'skip' says nothing
            module(_poisoned())
        for key, value in _buffers(module).items():
            assert torch.equal(value, before[key]), f"{key} changed"
    assert _counters(fused) == _counters(plain)
    assert _counters(fused)["skipped_updates"] == 1 and _counters(fused)["nonfinite_events"] == 1
    row = torch_safebn.report(model).rows[0]
    assert row["class"] == "SafeBatchNormAct2d" and row["batches"] == 2
    assert row["skipped_updates"] == 1 and row["nonfinite_events"] == 1


@pytest.mark.parametrize("act", ["relu", "gelu", "mish"])
def test_nonfinite_raises_by_default_with_an_activation_as_without(act):
    """The default policy raises NonFiniteError, with the plain module's message (its class name
    aside), and leaves the buffers untouched."""
    messages = []
    for module in (SafeBatchNormAct2d(3, act=act if act != "mish" else nn.Mish()), SafeBatchNorm2d(3)):
        module(make_input((4, 3, 2, 2)))
        before = _buffers(module)
        with pytest.raises(NonFiniteError) as info:
            module(_poisoned())
        for key, value in _buffers(module).items():
            assert torch.equal(value, before[key]), f"{key} changed"
        messages.append(str(info.value).replace(type(module).__name__, "<class>"))
    assert "SafeBatchNormAct2d(3)" not in messages[0] and "<class>(3)" in messages[0]
    assert messages[0] == messages[1]


def test_eval_with_an_activation_flags_invalid_running_statistics():
    """The eval check of the running statistics runs with a fused activation too."""
    fused = SafeBatchNormAct2d(3, act="silu").eval()
    with torch.no_grad():
        fused.running_var[1] = -1.0
    with pytest.raises(NonFiniteError, match="in eval mode.*variance in 1 channel"):
        fused(make_input((2, 3, 2, 2)))


def test_functional_batch_norm_act_guards_the_running_statistics():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(NonFiniteError, match="batch_norm"):
        batch_norm_act(_poisoned(), rm, rv, training=True, act="relu")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    batch_norm_act(_poisoned(), rm, rv, training=True, act="relu", on_nonfinite="skip")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_degenerate_batch_normalized_with_the_running_statistics_gets_the_activation():
    """on_degenerate='running_stats' (one value per channel): the eval op runs in the training
    forward's place, with the activation fused into it."""
    fused = SafeBatchNormAct2d(3, act="silu", on_degenerate="running_stats")
    with torch.no_grad():
        fused.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = make_input((1, 3, 1, 1))
    with pytest.warns(RuntimeWarning, match="normalized with the running statistics"):
        y = fused(x)
    expected = F.silu(F.batch_norm(x, fused.running_mean, fused.running_var, fused.weight, fused.bias, False))
    assert_close(y, expected, torch.float32, "degenerate batch")


@pytest.mark.parametrize("name", ["relu", "relu6"])
def test_a_nan_reaching_the_activation_stays_nan(name):
    """In eval mode nothing checks the input: a NaN from an upstream layer must come out as NaN,
    as from nn.BatchNorm2d + the native activation, not be hidden as 0."""
    factory, _, _ = ACTIVATIONS[name]
    fused = SafeBatchNormAct2d(3, act=factory()).eval()
    y = fused(_poisoned())
    expected = factory()(F.batch_norm(_poisoned(), fused.running_mean, fused.running_var, fused.weight, fused.bias))
    assert expected[0, 1, 0, 0].isnan()
    assert y[0, 1, 0, 0].isnan()


# -- errors ------------------------------------------------------------------------------------
VALID_NAMES = r"'identity', 'relu', 'relu6', 'leaky_relu', 'silu', 'gelu', 'gelu_tanh', 'hardswish', 'swish'"


def test_an_unknown_activation_name_lists_the_valid_ones():
    for make in (lambda: SafeBatchNormAct2d(3, act="mish"),
                 lambda: batch_norm_act(make_input((4, 3)), None, None, training=True, act="mish")):
        with pytest.raises(ValueError, match=rf"act must be None, a module, a module class or one of {VALID_NAMES}.*; "
                                             r"got 'mish'"):
            make()
    with pytest.raises(ValueError, match="got 5"):
        SafeBatchNormAct2d(3, act=5)


def test_batch_norm_act_refuses_an_activation_without_a_kernel():
    """The functional form fuses or refuses: it says what to do instead."""
    with pytest.raises(ValueError, match=r"not Mish\(\): apply it to batch_norm\(\)'s output instead"):
        batch_norm_act(make_input((4, 3)), None, None, training=True, act=nn.Mish())


def test_bad_inputs_get_errors_that_say_expected_and_got():
    fused = SafeBatchNormAct2d(3, act="silu")
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        fused(torch.randn(4, 3, 5))
    with pytest.raises(RuntimeError, match=r"should contain 5 elements not 3.*num_features"):
        fused(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match=r"2 to 5 dimensions.*got 1 dimensions with shape \[4\]"):
        batch_norm_act(torch.randn(4), None, None, training=True, act="relu")
    with pytest.raises(TypeError, match="expects a tensor input, got list"):
        batch_norm_act([1.0, 2.0], None, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        batch_norm_act(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(ValueError, match="activation_param must be finite, got nan"):
        batch_norm_act(torch.randn(4, 3), None, None, training=True, act="leaky_relu", negative_slope=math.nan)
    with pytest.raises(NotImplementedError, match="not implemented for torch.int64.*floating-point input"):
        fused(torch.ones(4, 3, 2, 2, dtype=torch.int64))


# -- timm ------------------------------------------------------------------------------------
TIMM_ACTIVATIONS = {"Swish": Activation.SILU, "HardSwish": Activation.HARDSWISH, "GELU": Activation.GELU,
                    "GELUTanh": Activation.GELU_TANH}


@pytest.mark.parametrize("cls_name", list(TIMM_ACTIVATIONS))
def test_timm_activations_are_fused_with_timms_numbers(cls_name):
    """timm's activation modules are recognised as the fused kind they compute, and
    SafeBatchNormAct2d with one gives timm's BatchNormAct2d's numbers, training and eval."""
    timm = pytest.importorskip("timm")
    act_class = getattr(timm.layers.activations, cls_name)
    assert fused_activation(act_class()) == (TIMM_ACTIVATIONS[cls_name], 0.0)
    theirs = timm.layers.BatchNormAct2d(SHAPE[1], act_layer=act_class)
    weight, bias = _affine(SHAPE[1], torch.float32)
    with torch.no_grad():
        theirs.weight.copy_(weight), theirs.bias.copy_(bias)
    ours = SafeBatchNormAct2d(SHAPE[1], act=act_class())
    ours.load_state_dict(theirs.state_dict())
    x = make_input(SHAPE)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        with _OpsCalled() as called:
            y = ours(x)
        assert [op[1] for op in called.safebn()] == [int(TIMM_ACTIVATIONS[cls_name])]
        assert_close(y, theirs(x), torch.float32, f"{cls_name} (training={training})")


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "leaky_relu"])
def test_state_dict_is_timms_both_ways(act):
    """SafeBatchNormAct2d's state_dict has timm's BatchNormAct2d's keys: each loads the other's
    strictly (SafeSyncBatchNormAct and SyncBatchNormAct alike)."""
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import convert_sync_batchnorm  # timm's only way to a SyncBatchNormAct

    pairs = [(timm.layers.BatchNormAct2d(4, act_layer=act), SafeBatchNormAct2d(4, act=act)),
             (convert_sync_batchnorm(timm.layers.BatchNormAct2d(4, act_layer=act)), SafeSyncBatchNormAct(4, act=act))]
    for theirs, ours in pairs:
        with torch.no_grad():
            theirs.running_mean.uniform_(), theirs.weight.uniform_()
        theirs.num_batches_tracked.fill_(3)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        copy.deepcopy(theirs).load_state_dict(ours.state_dict(), strict=True)


def test_convert_model_keeps_timms_activation_fused():
    """convert_model turns timm's BatchNormAct2d into SafeBatchNormAct2d with its act and drop,
    and the activation runs fused, with timm's numbers."""
    timm = pytest.importorskip("timm")
    theirs = timm.layers.BatchNormAct2d(SHAPE[1], act_layer="silu")
    ours = torch_safebn.convert_model(copy.deepcopy(nn.Sequential(theirs)))[0]
    assert type(ours) is SafeBatchNormAct2d and type(ours.act) is type(theirs.act)
    x = make_input(SHAPE)
    with _OpsCalled() as called:
        y = ours(x)
    assert [op[1] for op in called.safebn()] == [int(Activation.SILU)]
    assert_close(y, theirs(x), torch.float32, "converted BatchNormAct2d")
