"""SafeBatchNorm* against nn.BatchNorm* (and its float64 twin): outputs,
running statistics, num_batches_tracked and every gradient, over several
training steps and then eval, across ranks, layouts, dtypes and options."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import torch_safebn

from conftest import assert_close, make_input, module_pair

# (shape, layout): every rank; odd sizes (C=1, N=1 with spatial > 1, C not a
# multiple of the vector width, large C).
SHAPES = [
    ((16, 5), "contiguous"),
    ((6, 300), "contiguous"),
    ((5, 600), "contiguous"),
    ((2, 520, 3, 2), "channels_last"),
    ((4, 3, 17), "contiguous"),
    ((1, 4, 7), "contiguous"),
    ((4, 8, 5, 7), "contiguous"),
    ((4, 8, 5, 7), "channels_last"),
    ((2, 1, 9, 9), "contiguous"),
    ((1, 3, 5, 6), "channels_last"),
    ((2, 3, 13, 11), "channels_last"),
    ((3, 70, 3, 3), "channels_last"),
    ((2, 257, 4, 4), "contiguous"),
    ((15, 17, 11, 13), "contiguous"),  # reductions row by row; two tasks (2 threads) split at row 128 of 255
    ((2, 4, 3, 5, 6), "contiguous"),
    ((2, 4, 3, 5, 6), "channels_last_3d"),
]
# (input dtype, parameter dtype). Native computes bfloat16/bfloat16 in half
# precision; torch_safebn accumulates in float32, so those run against native
# with float32 parameters (DESIGN.md, Numerics).
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
OPTIONS = [
    dict(affine=a, track_running_stats=t, momentum=m)
    for a, t, m in itertools.product([True, False], [True, False], [0.1, None])
    if t or m == 0.1  # momentum only matters with running statistics
]


def _step(module, x, grad):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.filterwarnings("ignore:.*single example")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k[:5]}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{s}-{l}" for s, l in SHAPES])
def test_matches_native_over_training_then_eval(shape, layout, dtypes, options):
    """float32/float64 against native; float16/bfloat16 against the float64
    oracle (native on the same values in float64), since native's half-type
    backward rounds intermediates and strays several ulps from it, and
    torch_safebn rounds once, at the end."""
    dtype, param_dtype = dtypes
    half = dtype in (torch.float16, torch.bfloat16)
    native_param_dtype = torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype
    native, _ = module_pair(shape[1], len(shape), native_param_dtype, **options)
    _, safe = module_pair(shape[1], len(shape), param_dtype, **options)
    if param_dtype != native_param_dtype:  # same parameter values, rounded to param_dtype
        native.load_state_dict({k: v.to(param_dtype).to(v.dtype) if v.is_floating_point() else v
                                for k, v in native.state_dict().items()})
        safe.load_state_dict({k: v.to(param_dtype) if v.is_floating_point() else v
                              for k, v in native.state_dict().items()})
    expected_module = copy.deepcopy(native).double() if half else native
    compare_dtype = dtype if param_dtype != torch.bfloat16 else torch.bfloat16
    for step, training in enumerate([True, True, True, False]):
        expected_module.train(training)
        safe.train(training)
        x = make_input(shape, dtype, layout, seed=step)
        grad = make_input(shape, dtype, layout, offset=0.0, scale=1.0, seed=100 + step)
        y_safe, gx_safe = _step(safe, x, grad)
        y_expected, gx_expected = _step(expected_module, x.double(), grad.double()) if half else _step(native, x, grad)
        where = f"step {step} ({'train' if training else 'eval'})"
        assert y_safe.dtype == dtype and y_safe.shape == x.shape
        assert y_safe.stride() == x.stride(), f"{where}: output layout differs from the input's"
        assert_close(y_safe, y_expected, compare_dtype, f"{where} output")
        assert_close(gx_safe, gx_expected, compare_dtype, f"{where} grad_input")
        if safe.weight is not None:
            # parameter gradients sum over N*S values: scale the tolerance with it
            scale = max(1.0, (x.numel() / shape[1]) ** 0.5)
            for name in ("weight", "bias"):
                g_safe, g_expected = getattr(safe, name).grad, getattr(expected_module, name).grad
                assert g_safe.dtype == getattr(safe, name).dtype
                assert_close(g_safe / scale, g_expected / scale, compare_dtype, f"{where} grad_{name}")
                getattr(safe, name).grad = getattr(expected_module, name).grad = None
        if safe.track_running_stats:
            assert_close(safe.running_mean, expected_module.running_mean, compare_dtype, f"{where} running_mean")
            assert_close(safe.running_var, expected_module.running_var, compare_dtype, f"{where} running_var")
            assert safe.num_batches_tracked.item() == expected_module.num_batches_tracked.item()


# (shape, layout) whose elementwise pass after its reduction walks each of
# its two tasks backwards in several pieces (csrc/cpu/passes.h, walk_rows):
# rows of blocks, (n, c) rows, and the rows after a plane split into slices.
PIECEWISE = [((64, 64, 16, 16), "channels_last"), ((64, 64, 16, 16), "contiguous"), ((8, 2, 130, 130), "contiguous")]


@pytest.mark.parametrize("shape,layout", PIECEWISE)
def test_passes_walked_backwards_in_pieces_match_native(shape, layout, two_threads):
    native, safe = module_pair(shape[1], len(shape))
    x = make_input(shape, torch.float32, layout, seed=1)
    grad = make_input(shape, torch.float32, layout, offset=0.0, scale=1.0, seed=2)
    y_safe, gx_safe = _step(safe, x, grad)
    y_native, gx_native = _step(native, x, grad)
    assert_close(y_safe, y_native, torch.float32, "output")
    assert_close(gx_safe, gx_native, torch.float32, "grad_input")
    scale = (x.numel() / shape[1]) ** 0.5  # parameter gradients sum over N * S values
    for name in ("weight", "bias"):
        assert_close(getattr(safe, name).grad / scale, getattr(native, name).grad / scale, torch.float32, name)
    assert_close(safe.running_var, native.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_standard_strides_are_accepted(layout):
    """A transposed view is neither contiguous nor channels_last: it is copied
    once to contiguous, and the numbers still match native."""
    native, safe = module_pair(6, 4)
    x = make_input((5, 6, 4, 3), layout=layout).transpose(2, 3)
    assert_close(safe(x), native(x), torch.float32, "output")


def test_empty_batch_matches_native_shape_and_changes_no_buffer():
    native, safe = module_pair(4, 4)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    before = {k: v.clone() for k, v in safe.state_dict().items()}
    y_safe, y_native = safe(x), native(x)
    assert y_safe.shape == y_native.shape == x.shape
    for key, value in safe.state_dict().items():
        assert torch.equal(value, before[key]), key
    y_safe.sum().backward()
    y_native.sum().backward()
    # zero parameter gradients, as native's: 0 * the empty batch's NaN invstd would poison the weights
    assert torch.equal(safe.weight.grad, native.weight.grad) and torch.equal(safe.bias.grad, native.bias.grad)


def test_bias_without_weight_gets_its_gradient():
    x, start = make_input((4, 3, 2, 2)), torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for batch_norm in (torch.nn.functional.batch_norm, torch_safebn.batch_norm):
        bias = start.clone().requires_grad_()
        batch_norm(x, None, None, None, bias, training=True).square().sum().backward()
        grads.append(bias.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0])
