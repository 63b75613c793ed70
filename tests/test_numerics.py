"""Accumulation accuracy: statistics of large-offset data in float32."""
from __future__ import annotations

import pytest
import torch

from conftest import make_input

OPS = torch.ops.safebn


@pytest.mark.parametrize("shape,layout", [((64, 2, 128, 128), "contiguous"), ((64, 2, 128, 128), "channels_last"),
                                          ((1_000_000, 2), "contiguous")])
def test_large_offset_variance_in_float32(shape, layout):
    """1e4 + N(0, 1): a naive sum of squares in float32 loses every digit of
    the variance; Welford with a Chan merge keeps it within 1e-4 relative."""
    x64 = make_input(shape, torch.float64, layout, offset=1e4, scale=1.0)
    var64, mean64 = torch.var_mean(x64, dim=[d for d in range(x64.dim()) if d != 1], correction=0)
    mean, var = OPS.batch_stats(x64.float())
    assert torch.allclose(var.double(), var64, rtol=1e-4, atol=0), (var, var64)
    assert torch.allclose(mean.double(), mean64, rtol=1e-7, atol=0)
    _, _, invstd = OPS.forward_train(x64.float(), None, None, 1e-5)
    assert torch.allclose(invstd.double(), torch.rsqrt(var64 + 1e-5), rtol=1e-4, atol=0)


def test_large_offset_normalized_output_in_float32():
    x64 = make_input((32, 3, 32, 32), torch.float64, offset=1e4)
    y, _, _ = OPS.forward_train(x64.float(), None, None, 1e-5)
    y64, _, _ = OPS.forward_train(x64, None, None, 1e-5)
    # x - mean is exact to float32's spacing at 1e4 (~1e-3); nothing is lost beyond that
    assert (y.double() - y64).abs().max() < 2e-3
