"""Deployment artifacts of a converted model are plain PyTorch: ONNX from both
exporters, an eval-mode torch.jit.trace (saved, loaded in a process without
torch_safebn), torch.jit.script, an eval-mode torch.export; their safety is
checked once, when they are made, and so is revert_model's."""
from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import torch_safebn
from torch_safebn import NonFiniteError


def _trained(model: nn.Module, shape=(8, 3, 12, 12), steps=3) -> nn.Module:
    """`model` after a few training batches (running statistics away from their defaults), in eval mode."""
    torch.manual_seed(0)
    for _ in range(steps):
        model(torch.randn(shape))
    return model.eval()


def _pair():
    torch.manual_seed(0)
    native = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                    nn.BatchNorm2d(4)))
    return native, torch_safebn.convert_model(copy.deepcopy(native)).eval()


def _poison(model: nn.Module, name: str = "4") -> nn.Module:
    with torch.no_grad():
        model.get_submodule(name).running_var[1] = -1.0  # running_var + eps <= 0
    return model


def _onnx_bytes(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation notes
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        return buffer.getvalue()


def _run_onnx(data: bytes, x: torch.Tensor):
    session = onnxruntime.InferenceSession(data)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_is_standard_onnx_and_matches_native(dynamo):
    native, safe = _pair()
    x = torch.randn(2, 3, 12, 12)
    data = _onnx_bytes(safe, x, dynamo)
    domains = {node.domain for node in onnx.load_from_string(data).graph.node}
    assert domains <= {"", "ai.onnx"}, f"a custom-domain node: {domains}"
    torch.testing.assert_close(_run_onnx(data, x), native(x), atol=1e-5, rtol=1e-5)
    assert _onnx_bytes(native, x, dynamo)  # the same model, native, exports too


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_refuses_unsafe_statistics_naming_the_layer(dynamo):
    """The dynamo exporter wraps what its capture raised in its own error, the cause kept."""
    _, safe = _pair()
    with pytest.raises(Exception) as raised:
        _onnx_bytes(_poison(safe), torch.randn(2, 3, 12, 12), dynamo)
    error = raised.value
    while not isinstance(error, NonFiniteError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, NonFiniteError), raised.value
    assert "'4': cannot make a deployment artifact" in str(error) and "running_var in 1 channel" in str(error)


@pytest.mark.parametrize("model_name", ["resnet18", "timm:efficientnet_b0"])
def test_onnx_of_real_models_matches_native(model_name):
    """Both exporters, onnxruntime within 1e-4 of native, no custom-domain node (the timm model's
    batch norm + activation exports as native's modules do)."""
    if model_name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        native = timm.create_model(model_name[5:], pretrained=False)
    else:
        torchvision = pytest.importorskip("torchvision")
        native = getattr(torchvision.models, model_name)()
    native = _trained(native, shape=(4, 3, 64, 64), steps=2)
    safe = torch_safebn.convert_model(copy.deepcopy(native)).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = native(x)
    for dynamo in (True, False):
        data = _onnx_bytes(safe, x, dynamo)
        assert {node.domain for node in onnx.load_from_string(data).graph.node} <= {"", "ai.onnx"}
        torch.testing.assert_close(_run_onnx(data, x), expected, atol=1e-4, rtol=1e-4)


def test_an_eval_trace_loads_and_runs_without_torch_safebn(tmp_path):
    native, safe = _pair()
    x = torch.randn(2, 3, 12, 12)
    traced = torch.jit.trace(safe, (x,))
    assert not [n for n in traced.inlined_graph.nodes() if n.kind().startswith("safebn::")]
    torch.jit.save(traced, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\n"
              f"y = torch.jit.load({str(tmp_path / 'model.pt')!r})(torch.load({str(tmp_path / 'x.pt')!r}))\n"
              "assert 'torch_safebn' not in sys.modules\n"
              f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), native(x))
    with pytest.raises(NonFiniteError, match="'4': cannot make a deployment artifact"):
        torch.jit.trace(_poison(safe), (x,))


@pytest.mark.parametrize("with_timm", [False, True])
def test_script_compiles_native_forward_and_leaves_the_model_guarded(with_timm):
    """torch.jit.script of a converted model (timm's batch norm + activation too): native's
    numbers, the eager modules untouched and still guarded, the statistics checked once."""
    native, safe = _pair()
    if with_timm:
        timm = pytest.importorskip("timm")
        native = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU)))
        safe = torch_safebn.convert_model(copy.deepcopy(native)).eval()
    x = torch.randn(2, 3, 12, 12)
    scripted = torch.jit.script(safe)
    torch.testing.assert_close(scripted(x), native(x))
    assert isinstance(safe[1], torch_safebn.SafeBatchNorm2d if not with_timm else torch_safebn.SafeBatchNormAct2d)
    with pytest.raises(NonFiniteError, match="'1': cannot make a deployment artifact"):
        torch.jit.script(_poison(safe, "1"))


def test_eval_export_holds_native_ops_and_is_checked():
    native, safe = _pair()
    x = torch.randn(2, 3, 12, 12)
    program = torch.export.export(safe, (x,))
    assert not [n for n in program.graph.nodes if "safebn" in str(n.target)]
    torch.testing.assert_close(program.module()(x), native(x))
    with pytest.raises(NonFiniteError, match="'4': cannot make a deployment artifact"):
        torch.export.export(_poison(safe), (x,))


def test_revert_model_refuses_unsafe_statistics_unless_told():
    _, safe = _pair()
    _poison(safe)
    with pytest.raises(NonFiniteError, match="'4': cannot revert it to its native class.*running_var in 1 channel"):
        torch_safebn.revert_model(safe)
    assert isinstance(safe[4], torch_safebn.SafeBatchNorm2d), "a refused revert changes nothing"
    torch_safebn.revert_model(safe, check=False)
    assert type(safe[4]) is nn.BatchNorm2d
