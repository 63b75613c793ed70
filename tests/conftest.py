"""Shared helpers: building native/safe module pairs and comparing them."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_safebn

NATIVE_FOR_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
LAYOUTS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
# (atol, rtol) against native, per input dtype: float32 and float64 differ by
# summation order only; half types by one rounding of the output.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (3e-2, 1.6e-2),
    torch.float16: (4e-3, 2e-3),
}


def make_input(shape, dtype=torch.float32, layout="contiguous", offset=0.5, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).contiguous(memory_format=LAYOUTS[layout])


@pytest.fixture
def two_threads():
    """Two threads, so that inputs large enough are split into two tasks on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def module_pair(num_features, dim, param_dtype=torch.float32, seed=0, **native_options):
    """A native module with random affine parameters and its converted twin."""
    native = NATIVE_FOR_DIM[dim](num_features, dtype=param_dtype, **native_options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if native.weight is not None:
            native.weight.copy_(torch.rand(num_features, generator=g) + 0.5)
        if native.bias is not None:
            native.bias.copy_(torch.randn(num_features, generator=g))
    safe = torch_safebn.convert_model(copy.deepcopy(native))
    return native, safe


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def forward_train(x, weight=None, bias=None, eps=1e-5):
    """The training forward's (output, mean, invstd), no buffers given."""
    return torch.ops.safebn.forward_train(x, weight, bias, None, None, None, None, 0.1, eps)


def forward_eval(x, weight, bias, running_mean, running_var, eps=1e-5):
    """The eval forward's output, unchecked."""
    return torch.ops.safebn.batch_norm_eval(x, weight, bias, running_mean, running_var, None, eps)
