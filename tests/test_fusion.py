"""Fusers and quantization on a converted model give native's result: torch's
eager fuse_modules and FX graph mode quantization through their public
extension points (torch_safebn.fusion), torch.fx's optimization.fuse through
revert_model, inductor's freezing directly; nothing is left unfolded silently."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import torch_safebn
from torch_safebn import NonFiniteError, fusion


def _pair():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
                           nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6))
    for _ in range(3):
        native(torch.randn(8, 3, 8, 8))
    native.eval()
    return native, torch_safebn.convert_model(copy.deepcopy(native)).eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
GROUPS = [["0", "1", "2"], ["3", "4"], ["6", "7"]]


def test_fuse_modules_with_the_custom_config_gives_natives_result():
    native, safe = _pair()
    expected = fuse_modules(copy.deepcopy(native), GROUPS)
    fused = fuse_modules(copy.deepcopy(safe), GROUPS, fuse_custom_config_dict=fusion.fuse_custom_config())
    assert [type(m) for m in fused] == [type(m) for m in expected]
    torch.testing.assert_close(fused(X), expected(X))
    with pytest.raises(AssertionError, match="did not find fuser method"):  # torch's own error, not silence
        fuse_modules(copy.deepcopy(safe), GROUPS)


def test_fusing_checks_the_statistics_first():
    _, safe = _pair()
    with torch.no_grad():
        safe[1].running_var[0] = float("nan")
    with pytest.raises(NonFiniteError, match="'1': cannot hand it to a tool that knows native's classes"):
        fuse_modules(safe, GROUPS, fuse_custom_config_dict=fusion.fuse_custom_config())


def _quantized(model, **kwargs):
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (X,), **kwargs)
    for seed in range(4):
        prepared(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    return convert_fx(prepared, **kwargs)


def test_fx_quantization_with_the_backend_config_gives_natives_result():
    native, safe = _pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = _quantized(native)
        quantized = _quantized(safe, backend_config=fusion.backend_config())
    assert not [w for w in caught if "matches batch norms by their native class" in str(w.message)]
    torch.testing.assert_close(quantized(X), expected(X))
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert not kinds & {"SafeBatchNorm2d", "SafeBatchNorm1d", "BatchNorm2d"}, kinds


def test_fx_quantization_without_it_warns_once_for_the_model():
    _, safe = _pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quantized(safe)
    ours = [str(w.message) for w in caught if "FX graph mode quantization matches batch norms" in str(w.message)]
    assert len(ours) == 1 and "backend_config=torch_safebn.fusion.backend_config()" in ours[0]
    assert f"the model's {sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in safe.modules())} torch_safebn" \
        in ours[0]


def test_qat_with_the_backend_config_fuses_as_native():
    native, safe = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notes
        expected = prepare_qat_fx(copy.deepcopy(native).train(), get_default_qat_qconfig_mapping(), (X,))
        prepared = prepare_qat_fx(copy.deepcopy(safe).train(), get_default_qat_qconfig_mapping(), (X,),
                                  backend_config=fusion.backend_config())
    fused = sorted(type(m).__name__ for m in prepared.modules() if "Bn" in type(m).__name__)
    assert fused == sorted(type(m).__name__ for m in expected.modules() if "Bn" in type(m).__name__)
    assert fused == ["ConvBn2d", "ConvBnReLU2d", "LinearBn1d"]


def test_fx_optimization_fuse_through_revert_model():
    """torch.fx.experimental.optimization.fuse has no extension point: revert_model (checked)
    gives it native's modules."""
    from torch.fx.experimental.optimization import fuse

    native, safe = _pair()
    expected = fuse(copy.deepcopy(native)[:5])
    fused = fuse(torch_safebn.revert_model(copy.deepcopy(safe))[:5])
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    torch.testing.assert_close(fused(X), expected(X))


def test_inductor_freezing_folds_converted_batch_norms():
    native, safe = _pair()
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(safe)
        torch.testing.assert_close(compiled(X), native(X), atol=1e-5, rtol=1e-5)
