"""First and second derivatives in float64, training and eval, affine on/off,
through the public functional form and through the modules."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import torch_safebn
from conftest import make_input


def _inputs(shape, layout, affine):
    x = make_input(shape, torch.float64, layout).requires_grad_()
    C = shape[1]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=torch.float64).requires_grad_() if affine else None
    return x, w, b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout", [((4, 3), "contiguous"), ((3, 2, 5), "contiguous"),
                                          ((2, 3, 3, 2), "channels_last")])
def test_gradcheck_and_gradgradcheck(shape, layout, training, affine):
    x, w, b = _inputs(shape, layout, affine)
    running_mean = torch.randn(shape[1], dtype=torch.float64)
    running_var = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def f(x, *params):
        weight, bias = params if affine else (None, None)
        # running statistics are cloned: the training step updates them
        return torch_safebn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                                       training=training, momentum=0.1, eps=1e-3)

    args = (x, w, b) if affine else (x,)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def test_module_gradgradcheck_matches_native_second_derivative():
    """The double-backward path gives native's numbers, not only consistent ones."""
    x, _, _ = _inputs((4, 3, 2, 2), "contiguous", False)
    native = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    safe = torch_safebn.convert_model(torch.nn.BatchNorm2d(3, dtype=torch.float64))
    results = []
    for module in (native, safe):
        y = module(x)
        (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx ** 2).sum(), x)
        results.append((gx.detach(), ggx))
    torch.testing.assert_close(results[1], results[0])
