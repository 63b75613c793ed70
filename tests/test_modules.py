"""Drop-in behaviour: constructor, isinstance, state_dict keys and loading
both ways, convert_model/revert_model, extra_repr, and the pure-PyTorch
fallback when the extension cannot load."""
from __future__ import annotations

import copy
import inspect
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torch_safebn
from conftest import make_input

PAIRS = [(nn.BatchNorm1d, torch_safebn.SafeBatchNorm1d), (nn.BatchNorm2d, torch_safebn.SafeBatchNorm2d),
         (nn.BatchNorm3d, torch_safebn.SafeBatchNorm3d)]


@pytest.mark.parametrize("native_cls,safe_cls", PAIRS)
def test_constructor_is_a_superset_of_the_installed_torch(native_cls, safe_cls):
    native = inspect.signature(native_cls.__init__).parameters
    safe = inspect.signature(safe_cls.__init__).parameters
    for name, param in native.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:  # e.g. bias=, taken through **native_options
            assert "native_options" in safe
            continue
        assert name in safe and safe[name].default == param.default, name
    assert issubclass(safe_cls, native_cls)


@pytest.mark.parametrize("native_cls,safe_cls", PAIRS)
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}])
def test_state_dict_loads_strictly_both_ways(native_cls, safe_cls, options):
    native, safe = native_cls(5, **options), safe_cls(5, **options)
    assert list(safe.state_dict()) == list(native.state_dict())
    with torch.no_grad():
        for t in native.state_dict().values():
            t.copy_(torch.rand_like(t.float()).to(t.dtype) * 3 if t.is_floating_point() else t + 7)
    safe.load_state_dict(native.state_dict(), strict=True)
    for key, value in native.state_dict().items():
        assert torch.equal(safe.state_dict()[key], value), key
    back = native_cls(5, **options)
    back.load_state_dict(safe.state_dict(), strict=True)


def test_convert_and_revert_keep_parameters_buffers_dtype_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None), nn.Sequential(nn.BatchNorm1d(2, affine=False)),
                          nn.BatchNorm3d(3, eps=1e-3, dtype=torch.float64)).eval()
    model[0].train()
    model[1].weight.requires_grad_(False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_()
                m.num_batches_tracked.fill_(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = [m.training for m in model.modules()]
    torch_safebn.convert_model(model, on_nonfinite="skip")
    assert type(model[1]) is torch_safebn.SafeBatchNorm2d and type(model[2][0]) is torch_safebn.SafeBatchNorm1d
    assert type(model[3]) is torch_safebn.SafeBatchNorm3d and model[3].weight.dtype == torch.float64
    assert model[3].eps == 1e-3 and model[1].momentum is None and not model[2][0].affine
    assert model[1].policy.on_nonfinite == "skip" and not model[1].weight.requires_grad
    assert [m.training for m in model.modules()] == training
    assert model[2][0].safety_state.name == "2.0"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch_safebn.revert_model(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm1d
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert isinstance(torch_safebn.convert_model(nn.BatchNorm2d(3)), torch_safebn.SafeBatchNorm2d)


def test_convert_model_keeps_the_parameter_and_buffer_objects():
    """An optimizer built before the conversion keeps training the same tensors."""
    model = nn.Sequential(nn.BatchNorm2d(3))
    weight, running_mean = model[0].weight, model[0].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_safebn.convert_model(model)
    assert model[0].weight is weight and model[0].running_mean is running_mean
    model(make_input((4, 3, 2, 2))).square().sum().backward()
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_a_half_precision_cast_of_every_buffer_keeps_the_counts():
    bn = torch_safebn.SafeBatchNorm2d(3)
    with torch.no_grad():
        bn.safety_counters.fill_(2049)  # not a float16 number
    bn._apply(lambda t: t.half())
    assert bn.safety_counters.dtype == torch.int64 and bn.safety_counters.tolist() == [2049] * len(bn.safety_counters)


@pytest.mark.parametrize("how", ["_apply", "setattr"])
@pytest.mark.parametrize("training", [True, False])
def test_a_conversion_of_every_buffer_keeps_the_counters_counting(how, training):
    """Casting every buffer to float32 (module._apply, or setattr as PyTorch's test_to does) makes
    native's num_batches_tracked a float and leaves it working; the counters stay int64 and the
    module matches native."""
    native = nn.BatchNorm2d(3).train(training)
    safe = torch_safebn.convert_model(copy.deepcopy(native))
    for module in (native, safe):
        if how == "_apply":
            module._apply(lambda t: t.float())
        else:
            for name, buffer in list(module.named_buffers()):
                setattr(module, name, buffer.float())
    assert native.num_batches_tracked.dtype == safe.num_batches_tracked.dtype == torch.float32
    assert safe.safety_counters.dtype == torch.int64
    x = make_input((4, 3, 2, 2))
    torch.testing.assert_close(safe(x), native(x))
    torch.testing.assert_close(dict(safe.state_dict()), dict(native.state_dict()))
    assert torch_safebn.report(safe).rows[0]["batches"] == (1 if training else 0)


def test_modules_deepcopy_and_pickle_with_a_snapshot_in_flight():
    bn = torch_safebn.SafeBatchNorm2d(3)
    bn.safety_state._pending = (torch.zeros(3), object(), ((1,), True))  # stands in for a CUDA event
    clone = copy.deepcopy(bn)
    assert clone.safety_state._pending is None and clone.safety_state.policy == bn.policy
    assert pickle.loads(pickle.dumps(bn)).safety_state._pending is None


def test_extra_repr_shows_only_non_default_options():
    assert repr(torch_safebn.SafeBatchNorm2d(4)) == repr(nn.BatchNorm2d(4)).replace("BatchNorm2d", "SafeBatchNorm2d")
    text = repr(torch_safebn.SafeBatchNorm2d(4, on_nonfinite="skip", freeze_stats=True))
    assert text.endswith("on_nonfinite='skip', freeze_stats=True)")


def test_functional_matches_F_batch_norm():
    x = make_input((4, 3, 5, 5))
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.rand(3), torch.randn(3)
    expected = nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    actual = torch_safebn.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close((rm2, rv2), (rm, rv))
    assert list(inspect.signature(torch_safebn.batch_norm).parameters)[:8] == list(
        inspect.signature(nn.functional.batch_norm).parameters)


def test_reference_fallback_when_the_extension_cannot_load(tmp_path):
    """With _C unimportable, the same ops come from reference.py, a warning
    says so once, backend() reports it, and the numbers still match native."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["torch_safebn._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, torch_safebn
        assert torch_safebn.backend() == "reference", torch_safebn.backend()
        assert sum("reference implementation" in str(w.message) for w in caught) == 1
        torch.manual_seed(0)
        native = torch.nn.BatchNorm2d(3)
        safe = torch_safebn.convert_model(torch.nn.BatchNorm2d(3))
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = native(x), safe(x2)
        y.square().sum().backward(); y2.square().sum().backward()
        torch.testing.assert_close(y2, y); torch.testing.assert_close(x2.grad, x.grad)
        torch.testing.assert_close(safe.running_var, native.running_var)
        x3 = x.detach().clone(); x3[0, 1, 0, 0] = float("nan")
        try:
            safe(x3)
        except torch_safebn.NonFiniteError:
            pass
        else:
            raise AssertionError("the fallback must guard too")
        torch.testing.assert_close(safe.running_var, native.running_var)
        print("fallback ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
