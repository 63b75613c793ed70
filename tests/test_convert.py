"""convert_model guards every batch norm it can (issue 14): the lazy batch norms before and
after their first input, nn.SyncBatchNorm, timm's BatchNormAct2d (with its activation, fused or
not, its dropout, or none) and SyncBatchNormAct; revert_model gives each original class back; a
batch norm it cannot guard (a subclass with a forward of its own) is named in a warning at the
caller's line, strict=True refuses it before any change, and report() lists it; timm stays
optional (never imported for a model without it, and a timm that cannot be imported does not
stop the conversion)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import torch_safebn
from conftest import assert_close, make_input
from torch_safebn import (
    SafeBatchNorm1d,
    SafeBatchNorm2d,
    SafeBatchNorm3d,
    SafeBatchNormAct2d,
    SafeLazyBatchNorm1d,
    SafeLazyBatchNorm2d,
    SafeLazyBatchNorm3d,
    SafeSyncBatchNorm,
    SafeSyncBatchNormAct,
    UnconvertedBatchNormError,
)

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# spatial dims: (native lazy class, what convert_model makes of it, what that becomes at its first input)
LAZY = {
    1: (nn.LazyBatchNorm1d, SafeLazyBatchNorm1d, SafeBatchNorm1d),
    2: (nn.LazyBatchNorm2d, SafeLazyBatchNorm2d, SafeBatchNorm2d),
    3: (nn.LazyBatchNorm3d, SafeLazyBatchNorm3d, SafeBatchNorm3d),
}
LAZY_OPTIONS = [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None, "eps": 1e-3},
                pytest.param({"bias": False}, id="bias=False")]


class MyBN(nn.BatchNorm2d):
    """A user's batch norm with a forward of its own: convert_model cannot know what it computes."""

    def forward(self, x):
        return super().forward(x) * 2.0


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating parameter and buffer of `module` random (variances positive), and
    num_batches_tracked non-zero, so that a value lost or swapped reads as a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith(("running_var", "weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=g, dtype=F64) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=F64))
    return module


def _assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    """The same state_dict keys in the same order, and bitwise equal values."""
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert list(actual_state) == list(expected_state)
    for key, value in expected_state.items():
        assert actual_state[key].dtype == value.dtype and torch.equal(actual_state[key], value), key


def _assert_loads_strictly_both_ways(converted: nn.Module, native: nn.Module) -> None:
    """Each loads the other's state_dict with strict=True, and takes its values."""
    source = _randomize(copy.deepcopy(native), seed=11)
    target = copy.deepcopy(converted)
    target.load_state_dict(source.state_dict(), strict=True)
    _assert_same_state(target, source)
    source = _randomize(copy.deepcopy(converted), seed=12)
    back = copy.deepcopy(native)
    back.load_state_dict(source.state_dict(), strict=True)
    _assert_same_state(back, source)


def _lazy_input(dims: int, seed: int = 0) -> torch.Tensor:
    return make_input((4, 3) + (3,) * dims, dtype=F64, seed=seed)


# -- lazy batch norms -------------------------------------------------------------------------------
@pytest.mark.parametrize("options", LAZY_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dims", sorted(LAZY))
def test_lazy_batch_norm_is_guarded_before_and_after_its_first_input(dims, options):
    """nn.LazyBatchNorm{1,2,3}d not materialized yet becomes SafeLazyBatchNorm{1,2,3}d, keeping
    the safety options given; its first input makes it a SafeBatchNorm{1,2,3}d (the policy kept)
    with the native lazy module's num_features, dtype, outputs, input gradients and buffers on
    the same float64 inputs, in training and then in eval (parameter gradients accumulating)."""
    native_cls, safe_lazy_cls, safe_cls = LAZY[dims]
    native = native_cls(dtype=F64, **options)
    # (an uninitialized lazy module cannot be deep-copied: a twin is built instead)
    safe = torch_safebn.convert_model(nn.Sequential(native_cls(dtype=F64, **options)), on_single_sample="ignore")[0]
    assert type(safe) is safe_lazy_cls
    assert list(safe.state_dict()) == list(native.state_dict())
    for step, training in enumerate((True, True, False)):
        native.train(training), safe.train(training)
        x_native = _lazy_input(dims, seed=step).requires_grad_()
        x_safe = x_native.detach().clone().requires_grad_()
        expected, got = native(x_native), safe(x_safe)
        assert type(safe) is safe_cls and safe.num_features == native.num_features == 3
        assert safe.policy.on_single_sample == "ignore"
        assert_close(got, expected, F64, f"output (step {step})")
        dy = _lazy_input(dims, seed=10 + step)
        expected.backward(dy), got.backward(dy)
        assert_close(x_safe.grad, x_native.grad, F64, f"input grad (step {step})")
        for name, param in native.named_parameters():
            assert_close(getattr(safe, name).grad, param.grad, F64, f"{name} grad (step {step})")
        assert list(safe.state_dict()) == list(native.state_dict())
        for key, value in native.state_dict().items():
            assert safe.state_dict()[key].dtype == value.dtype == (torch.int64 if "tracked" in key else F64), key
            assert_close(safe.state_dict()[key], value, F64, key)


@pytest.mark.parametrize("dims", sorted(LAZY))
def test_lazy_batch_norm_converted_after_its_first_input_is_a_safe_batch_norm(dims):
    """A native lazy batch norm that has seen its input is an nn.BatchNorm{1,2,3}d: it converts to
    SafeBatchNorm{1,2,3}d holding its very parameters and buffers."""
    native_cls, _, safe_cls = LAZY[dims]
    native = native_cls(dtype=F64)
    native(_lazy_input(dims))
    expected = copy.deepcopy(native)
    weight, running_var = native.weight, native.running_var
    safe = torch_safebn.convert_model(native)
    assert type(safe) is safe_cls and safe.num_features == 3
    assert safe.weight is weight and safe.running_var is running_var
    _assert_same_state(safe, expected)
    x = _lazy_input(dims, seed=3)
    assert_close(safe(x), expected(x), F64, "output after the conversion")


def test_revert_model_gives_an_unmaterialized_lazy_batch_norm_back():
    """convert then revert before any input: nn.LazyBatchNorm2d again, which still materializes
    and computes as the original lazy module does."""
    model = nn.Sequential(nn.LazyBatchNorm2d(momentum=0.3, dtype=F64))
    original = nn.Sequential(nn.LazyBatchNorm2d(momentum=0.3, dtype=F64))
    torch_safebn.revert_model(torch_safebn.convert_model(model))
    assert type(model[0]) is nn.LazyBatchNorm2d and model[0].momentum == 0.3
    x = _lazy_input(2)
    assert_close(model(x), original(x), F64, "reverted lazy batch norm")
    _assert_same_state(model, original)


# -- nn.SyncBatchNorm and timm's SyncBatchNormAct (construction and state only) -------------------
def test_sync_batch_norm_becomes_safe_sync_batch_norm_with_its_state_and_group():
    """nn.SyncBatchNorm (no process group is needed to build it) becomes SafeSyncBatchNorm with
    the same state_dict keys and values and its process group, and loads strictly both ways."""
    native = _randomize(nn.SyncBatchNorm(5, eps=1e-3, momentum=0.2))
    group = object()  # conversion only carries the group
    native.process_group = group
    expected = copy.deepcopy(native)
    safe = torch_safebn.convert_model(nn.Sequential(native))[0]
    assert type(safe) is SafeSyncBatchNorm and safe.process_group is group
    assert safe.eps == 1e-3 and safe.momentum == 0.2
    _assert_same_state(safe, expected)
    _assert_loads_strictly_both_ways(safe, expected)


def test_timm_sync_batch_norm_act_becomes_safe_sync_batch_norm_act():
    """timm's SyncBatchNormAct (made by timm's convert_sync_batchnorm) becomes
    SafeSyncBatchNormAct with its act and drop, the same state_dict, and strict loads both ways."""
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import convert_sync_batchnorm

    theirs = convert_sync_batchnorm(nn.Sequential(timm.layers.BatchNormAct2d(
        5, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.2}, drop_layer=nn.Dropout)))[0]
    assert type(theirs) is timm.layers.norm_act.SyncBatchNormAct
    _randomize(theirs)
    expected = copy.deepcopy(theirs)
    ours = torch_safebn.convert_model(nn.Sequential(theirs))[0]
    assert type(ours) is SafeSyncBatchNormAct
    assert type(ours.act) is nn.LeakyReLU and ours.act.negative_slope == 0.2
    assert type(ours.drop) is nn.Dropout and ours.drop.p == 0.5
    _assert_same_state(ours, expected)
    _assert_loads_strictly_both_ways(ours, expected)


# -- timm's BatchNormAct2d --------------------------------------------------------------------------
# case: timm's BatchNormAct2d keyword arguments. Fused (relu, silu, gelu, hardswish, leaky_relu,
# relu6) and not (mish, ELU), with a dropout (which turns the fusion off), without an activation,
# and with the batch norm's own options.
TIMM_CASES = {
    "relu": {"act_layer": "relu"},
    "silu": {"act_layer": "silu"},
    "gelu": {"act_layer": "gelu"},
    "hardswish": {"act_layer": "hard_swish"},
    "leaky_relu": {"act_layer": "leaky_relu", "act_kwargs": {"negative_slope": 0.2}},
    "mish": {"act_layer": "mish"},
    "elu_class": {"act_layer": nn.ELU},
    "relu_dropout": {"act_layer": "relu", "drop_layer": nn.Dropout},
    "mish_dropout": {"act_layer": "mish", "drop_layer": nn.Dropout},
    "relu6_momentum_none": {"act_layer": "relu6", "momentum": None},
    "silu_no_affine": {"act_layer": "silu", "affine": False},
    "gelu_untracked": {"act_layer": "gelu", "track_running_stats": False},
    "no_act": {"apply_act": False},
    "no_act_dropout": {"apply_act": False, "drop_layer": nn.Dropout},
}


def _timm_bn_act(case):
    timm = pytest.importorskip("timm")
    return _randomize(timm.layers.BatchNormAct2d(5, dtype=F64, **TIMM_CASES[case]))


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_batch_norm_act_converts_with_its_act_drop_and_state(case):
    """timm's BatchNormAct2d becomes SafeBatchNormAct2d keeping its act and drop children (same
    classes and settings), the same state_dict keys and values, and strict loads both ways."""
    theirs = _timm_bn_act(case)
    expected = copy.deepcopy(theirs)
    ours = torch_safebn.convert_model(nn.Sequential(theirs))[0]
    assert type(ours) is SafeBatchNormAct2d
    assert [name for name, _ in ours.named_children()] == [name for name, _ in expected.named_children()]
    for name, child in expected.named_children():
        assert type(getattr(ours, name)) is type(child), name
        assert repr(getattr(ours, name)) == repr(child), name  # the slope, the dropout's p, inplace
    _assert_same_state(ours, expected)
    _assert_loads_strictly_both_ways(ours, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_batch_norm_act_converted_computes_timms_numbers(case, training):
    """The converted module's output, its input, weight and bias gradients, and its running
    statistics are timm's BatchNormAct2d's, in float64, two steps in a row (a dropout draws the
    same mask from the same seed)."""
    theirs = _timm_bn_act(case).train(training)
    ours = torch_safebn.convert_model(copy.deepcopy(theirs))
    assert type(ours) is SafeBatchNormAct2d
    for step in range(2):
        x_theirs = make_input((4, 5, 3, 3), dtype=F64, seed=step).requires_grad_()
        x_ours = x_theirs.detach().clone().requires_grad_()
        torch.manual_seed(step)
        expected = theirs(x_theirs)
        torch.manual_seed(step)
        got = ours(x_ours)
        what = f"{case} step {step}"
        assert_close(got, expected, F64, f"{what} output")
        dy = make_input(expected.shape, dtype=F64, seed=20 + step)
        expected.backward(dy), got.backward(dy)
        assert_close(x_ours.grad, x_theirs.grad, F64, f"{what} input grad")
        for name, param in theirs.named_parameters():
            assert_close(ours.get_parameter(name).grad, param.grad, F64, f"{what} {name} grad")
        for key, value in theirs.state_dict().items():
            assert_close(ours.state_dict()[key], value, F64, f"{what} {key}")


# -- revert_model ---------------------------------------------------------------------------------
def _mixed_model():
    """One of each convertible batch norm with 4 channels, and a timm one with a non-default act."""
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import convert_sync_batchnorm

    sync_act = convert_sync_batchnorm(nn.Sequential(timm.layers.BatchNormAct2d(4, act_layer="silu")))[0]
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.SyncBatchNorm(4),
        nn.Sequential(timm.layers.BatchNormAct2d(4, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.2}),
                      timm.layers.BatchNormAct2d(4, act_layer="mish", drop_layer=nn.Dropout)),
        sync_act,
    ).double()
    return _randomize(model)


def test_revert_model_gives_back_the_original_classes_state_and_outputs():
    """convert_model then revert_model: every module of its original class (nn.BatchNorm2d,
    nn.SyncBatchNorm, timm's BatchNormAct2d and SyncBatchNormAct, each with its act and drop of the
    same class and settings), the identical state_dict, and the original's outputs in training
    (the buffers too) and eval."""
    model = _mixed_model()
    original = copy.deepcopy(model)
    group = object()
    model[2].process_group = original[2].process_group = group
    torch_safebn.convert_model(model)
    assert [type(m) for m in model[1:3]] == [SafeBatchNorm2d, SafeSyncBatchNorm]
    assert [type(m) for m in model[3]] == [SafeBatchNormAct2d, SafeBatchNormAct2d]
    assert type(model[4]) is SafeSyncBatchNormAct
    torch_safebn.revert_model(model)
    # by name: SyncBatchNormAct's children come back as (drop, act), timm's convert_sync_batchnorm
    # adds them as (act, drop); neither holds state, so the state_dict is the same
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in original.named_modules()}
    assert model[2].process_group is group
    got_modules = dict(model.named_modules())
    for name, expected in original.named_modules():
        got = got_modules[name]
        if isinstance(expected, _BatchNorm):
            assert got.extra_repr() == expected.extra_repr(), name
            for child in ("act", "drop"):
                if hasattr(expected, child):
                    assert repr(getattr(got, child)) == repr(getattr(expected, child)), f"{name}.{child}"
    _assert_same_state(model, original)
    for step, training in enumerate((True, False)):
        model.train(training), original.train(training)
        x = make_input((4, 3, 3, 3), dtype=F64, seed=step)
        torch.manual_seed(step)
        expected = original(x)
        torch.manual_seed(step)
        assert_close(model(x), expected, F64, f"reverted model (training={training})")
        _assert_same_state(model, original)


# -- what convert_model cannot guard ----------------------------------------------------------------
def _model_with_my_bn():
    """Two MyBN (one nested) among batch norms that convert, and one converted before."""
    return nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4), nn.BatchNorm2d(4), nn.Sequential(MyBN(4), SafeBatchNorm2d(4)),
                         nn.Flatten(), nn.BatchNorm1d(36))


def test_a_subclass_is_left_as_it_is_and_named_in_one_warning_at_the_callers_line():
    """convert_model converts what it can, leaves both MyBN as they are (the same objects) and
    warns once, naming "2 MyBN", with the caller's file as the warning's filename."""
    model = _model_with_my_bn()
    mine = [model[1], model[3][0]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_safebn.convert_model(model)
    assert model[1] is mine[0] and model[3][0] is mine[1] and all(type(m) is MyBN for m in mine)
    assert type(model[2]) is SafeBatchNorm2d and type(model[3][1]) is SafeBatchNorm2d
    assert type(model[5]) is SafeBatchNorm1d
    relevant = [w for w in caught if "unguarded" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    warning = relevant[0]
    assert warning.category is RuntimeWarning
    assert "left batch norms unguarded: 2 MyBN." in str(warning.message)
    assert "strict=True" in str(warning.message)
    assert warning.filename == __file__
    model(make_input((4, 3, 3, 3)))  # the model still runs


def test_strict_raises_before_changing_anything():
    """strict=True raises UnconvertedBatchNormError (a TypeError) naming "2 MyBN", and leaves the
    model as it was: every module of its class, the same objects, the policy of the module
    converted before untouched by the options given."""
    model = _model_with_my_bn()
    modules = list(model.modules())
    classes = [type(m) for m in modules]
    with pytest.raises(UnconvertedBatchNormError, match=r"left batch norms unguarded: 2 MyBN\.") as info:
        torch_safebn.convert_model(model, strict=True, on_nonfinite="skip")
    assert isinstance(info.value, TypeError)
    assert list(model.modules()) == modules and [type(m) for m in model.modules()] == classes
    assert model[3][1].policy.on_nonfinite == "raise"


def test_report_lists_the_unguarded_batch_norms():
    """report(model) after a conversion that left MyBN: one row per batch norm, the MyBN rows not
    guarded (no counters, marked "(unguarded)" in the table), the others guarded."""
    model = _model_with_my_bn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_safebn.convert_model(model)
    model(make_input((4, 3, 3, 3)))
    rows = torch_safebn.report(model).rows
    assert [(row["module"], row["class"], row["guarded"]) for row in rows] == [
        ("1", "MyBN", False), ("2", "SafeBatchNorm2d", True), ("3.0", "MyBN", False),
        ("3.1", "SafeBatchNorm2d", True), ("5", "SafeBatchNorm1d", True)]
    assert all(row["batches"] == "-" for row in rows if not row["guarded"])
    assert all(row["batches"] == 1 for row in rows if row["guarded"])
    table = str(torch_safebn.report(model))
    assert [line.split()[0] for line in table.splitlines() if "(unguarded)" in line] == ["1", "3.0"]


def test_report_of_a_model_without_batch_norms():
    report = torch_safebn.report(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    assert report.rows == [] and str(report) == "no batch norms"


# -- timm stays optional ------------------------------------------------------------------------------
_SUBPROCESS = """
import sys
{setup}
import torch
import torch_safebn
from torch import nn
assert sys.modules.get("timm") is None, "importing torch_safebn imported timm"
model = torch_safebn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))
assert type(model[1]) is torch_safebn.SafeBatchNorm2d, type(model[1])
model(torch.randn(2, 3, 2, 2))
print("timm imported:", sys.modules.get("timm") is not None)
"""

# How timm is made unimportable in the subprocess.
_NO_TIMM = {
    "sys_modules_none": 'sys.modules["timm"] = None',
    "finder_raises": textwrap.dedent("""
        import importlib.abc
        class NoTimm(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "timm" or name.startswith("timm."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, NoTimm())
    """),
    # timm installed but failing at import (say, built against another torch)
    "broken_install": textwrap.dedent("""
        import importlib.abc, importlib.machinery
        class Broken(importlib.abc.Loader):
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise ImportError("timm is broken")
        class BrokenTimm(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "timm":
                    return importlib.machinery.ModuleSpec(name, Broken())
                return None
        sys.meta_path.insert(0, BrokenTimm())
    """),
}


def _run(setup: str) -> subprocess.CompletedProcess:
    script = _SUBPROCESS.format(setup=setup)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_convert_model_does_not_import_timm():
    """With timm installed but not imported, converting a model of torch's modules alone leaves
    timm out of sys.modules."""
    pytest.importorskip("timm")
    result = _run("")
    assert result.returncode == 0, result.stderr
    assert "timm imported: False" in result.stdout, result.stdout


@pytest.mark.parametrize("how", list(_NO_TIMM))
def test_convert_model_works_when_timm_cannot_be_imported(how):
    """timm is optional: however it fails to import, convert_model converts nn.BatchNorm2d (it looks
    timm's classes up only once timm is imported; these guard against a lookup that imports it)."""
    result = _run(_NO_TIMM[how])
    assert result.returncode == 0, result.stderr
    assert "timm imported: False" in result.stdout, result.stdout


# -- torchvision's FrozenBatchNorm2d --------------------------------------------------------------
def _frozen_pair(channels=4):
    torchvision = pytest.importorskip("torchvision")
    native = torchvision.ops.misc.FrozenBatchNorm2d(channels)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(native, name).copy_(torch.randn(channels, generator=g))
        native.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    model = nn.Sequential(nn.Conv2d(3, channels, 3), native)
    return model, torch_safebn.convert_model(copy.deepcopy(model), strict=True)


def test_frozen_batch_norm_is_guarded_with_the_same_buffers_and_numbers():
    native, safe = _frozen_pair()
    assert type(safe[1]).__name__ == "SafeFrozenBatchNorm2d" and isinstance(safe[1], type(native[1]))
    assert list(safe.state_dict()) == list(native.state_dict())
    native.load_state_dict(safe.state_dict(), strict=True)
    safe.load_state_dict({**native.state_dict(), "1.num_batches_tracked": torch.tensor(3)}, strict=True)
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):  # frozen: training mode changes nothing
        torch.testing.assert_close(safe.train(training)(x), native.train(training)(x))
    half = safe[1](x[:, :3].repeat(1, 2, 1, 1)[:, :4].half())
    assert half.dtype == native[1](x[:, :3].repeat(1, 2, 1, 1)[:, :4].half()).dtype == torch.float32
    rows = {row["module"]: row for row in torch_safebn.report(safe).rows}
    assert rows["1"]["class"] == "SafeFrozenBatchNorm2d" and rows["1"]["guarded"]


def test_frozen_batch_norm_with_a_negative_variance_raises_where_native_gives_nan():
    native, safe = _frozen_pair()
    for model in (native, safe):
        with torch.no_grad():
            model[1].running_var[2] = -1.0
    x = torch.randn(2, 3, 8, 8)
    assert not torch.isfinite(native(x)).all()
    with pytest.raises(torch_safebn.NonFiniteError, match=r"'1' in eval mode.*variance in 1 channel"):
        safe(x)


def test_frozen_batch_norm_is_reported_when_unguarded_and_reverts():
    native, safe = _frozen_pair()
    rows = torch_safebn.report(native).rows
    assert [(row["module"], row["class"], row["guarded"]) for row in rows] == [("1", "FrozenBatchNorm2d", False)]
    torch_safebn.revert_model(safe)
    assert type(safe[1]) is type(native[1])


def test_convert_sync_batchnorm_as_native():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    converted = torch_safebn.SafeSyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert converted is model
    assert [type(m) for m in (model[1], model[2][0])] == [torch_safebn.SafeSyncBatchNorm] * 2
