"""torch.compile(fullgraph=True) over a conv-bn-relu model: no graph break,
same numbers as eager, running statistics updated the same way."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_safebn


def _model():
    torch.manual_seed(0)
    return torch_safebn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                    nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


@pytest.mark.parametrize("training", [True, False])
def test_compiled_model_matches_eager(training):
    torch._dynamo.reset()
    eager = _model().train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")
    for step in range(2):
        x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(step), requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y_eager, y_compiled = eager(x), compiled(x2)
        torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=name)
        # The ops that update and check them take the (grad-requiring) weight and bias.
        assert not b.requires_grad, f"{name} requires grad after a compiled step"
    # A conv bias followed by batch norm has a zero gradient in exact
    # arithmetic, so its computed one is rounding noise of the largest
    # gradient: the absolute tolerance scales with that.
    largest = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-6 * largest, rtol=1e-5, msg=name)
