"""convert_model on real models, torchvision's and timm's, untrained: every batch norm of each is
guarded (timm's BatchNormAct2d with its activation included), the state_dict is the native
model's (keys, order, strict loads both ways), and three SGD steps then an eval forward in
float64 give the native model's losses, parameters, running statistics and logits. A user's
batch norm subclass inside a real model is left alone, named in a warning, and only it."""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import torch_safebn
from torch_safebn import SafeBatchNorm1d, SafeBatchNorm2d, SafeBatchNorm3d, SafeBatchNormAct2d
from torch_safebn.modules import _SafeBatchNormMixin

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

NUM_CLASSES = 10
BATCH = 4
STEPS = 3
# A small step: at lr 0.1 (0.01 for some models) the losses climb to 10-100 within three steps
# and training turns chaotic: the native model against itself with its parameters perturbed by
# one ulp then misses 1e-9 by up to 1000x, which says nothing about torch_safebn. torchvision's
# regnet_x_400mf is that sensitive at 64x64 even at 1e-3, hence shufflenet_v2_x0_5 in its place.
LR = 1e-3
# float64: the two differ by summation order only. Per tensor, relative to its largest value:
# elementwise, a weight that happens to be near 0 would measure rounding against itself.
RTOL, ATOL = 1e-9, 1e-12

# name: (a factory of the untrained model with every dropout and stochastic depth off, image size)
MODELS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES), 64),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(
        weights=None, num_classes=NUM_CLASSES, dropout=0.0), 64),
    "tv_densenet121": (lambda: torchvision.models.densenet121(weights=None, num_classes=NUM_CLASSES), 64),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(
        weights=None, num_classes=NUM_CLASSES, dropout=0.0, stochastic_depth_prob=0.0), 64),
    "tv_shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=NUM_CLASSES), 64),
    "timm_resnet18": (lambda: _timm("resnet18"), 64),
    "timm_dla34": (lambda: _timm("dla34", drop_path_rate=None), 64),  # DLA has no stochastic depth
    "timm_efficientnet_b0": (lambda: _timm("efficientnet_b0"), 64),
    "timm_regnetx_002": (lambda: _timm("regnetx_002"), 64),
    "timm_mobilenetv3_small_050": (lambda: _timm("mobilenetv3_small_050"), 64),
    "timm_cspdarknet53": (lambda: _timm("cspdarknet53"), 64),
    "timm_rexnet_100": (lambda: _timm("rexnet_100"), 64),  # BatchNorm2d and BatchNormAct2d mixed
}
# Batch norms of the timm models, as timm builds them today: a change shows here first.
KNOWN_COUNTS = {"timm_efficientnet_b0": 49, "timm_regnetx_002": 44, "timm_mobilenetv3_small_050": 34,
                "timm_cspdarknet53": 67}
SAFE_FOR = {nn.BatchNorm1d: SafeBatchNorm1d, nn.BatchNorm2d: SafeBatchNorm2d, nn.BatchNorm3d: SafeBatchNorm3d,
            timm.layers.BatchNormAct2d: SafeBatchNormAct2d}


class MyBN(nn.BatchNorm2d):
    """A user's batch norm with a forward of its own: convert_model cannot know what it computes."""

    def forward(self, x):
        return super().forward(x) + 0.0


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def _timm(name, drop_path_rate=0.0):
    options = {"drop_rate": 0.0} | ({} if drop_path_rate is None else {"drop_path_rate": drop_path_rate})
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **options)


@functools.lru_cache(maxsize=None)
def _native(name: str) -> nn.Module:
    """The model in float64, from seed 0, built once (tests work on deep copies)."""
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    for module in model.modules():  # nothing random may remain, or the two runs would differ
        if isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ == "StochasticDepth":
            assert module.p == 0.0, f"{name}: {module} is not off"
        if type(module).__name__ == "DropPath":
            assert module.drop_prob == 0.0, f"{name}: {module} is not off"
    return model


def _converted(name: str) -> tuple[nn.Module, nn.Module]:
    """A copy of the native model and its converted copy; the conversion must not warn."""
    native = copy.deepcopy(_native(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safe = torch_safebn.convert_model(copy.deepcopy(native))
    return native, safe


def _batches(name: str):
    _, size = MODELS[name]
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64),
             torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)) for _ in range(STEPS + 1)]


def _train(model: nn.Module, batches) -> tuple[list[torch.Tensor], torch.Tensor]:
    """STEPS steps of SGD on cross-entropy, then the logits of an eval forward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    losses = []
    for x, y in batches[:STEPS]:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        logits = model(batches[STEPS][0])
    return losses, logits


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Integers equal; floating tensors within ATOL + RTOL * max|expected| everywhere."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    error = (actual - expected).abs().max().item()
    bound = ATOL + RTOL * expected.abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {ATOL} + {RTOL} * max|expected| = {bound:.3g}"


def _count(model: nn.Module, cls=_BatchNorm) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_every_batch_norm_is_guarded(name):
    """Each native batch norm (nn.BatchNorm*d, timm's BatchNormAct2d) becomes its torch_safebn
    counterpart at the same place, with timm's activation and drop kept; nothing else changes
    class; report() lists every batch norm as guarded. The timm models' counts are the known ones."""
    native, safe = _converted(name)
    count = _count(native)
    assert count > 0
    if name in KNOWN_COUNTS:
        assert count == KNOWN_COUNTS[name]
    assert _count(safe) == _count(safe, _SafeBatchNormMixin) == count
    safe_modules = dict(safe.named_modules())
    assert list(safe_modules) == [n for n, _ in native.named_modules()]
    for module_name, module in native.named_modules():
        got = safe_modules[module_name]
        expected_class = SAFE_FOR.get(type(module), type(module))
        assert type(got) is expected_class, f"{module_name}: {type(got).__name__}, not {expected_class.__name__}"
        if isinstance(module, timm.layers.BatchNormAct2d):
            assert type(got.act) is type(module.act) and type(got.drop) is type(module.drop), module_name
    rows = torch_safebn.report(safe).rows
    assert len(rows) == count and all(row["guarded"] for row in rows)


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_is_the_native_models_and_loads_both_ways(name):
    """The converted model's state_dict has the native one's keys in the same order and the same
    values; each model loads the other's strictly (with values changed first, so that a load that
    did nothing shows)."""
    native, safe = _converted(name)
    native_state, safe_state = native.state_dict(), safe.state_dict()
    assert list(safe_state) == list(native_state)
    for key, value in native_state.items():
        assert torch.equal(safe_state[key], value), key

    def shifted(state, by):
        return {k: v + by if v.is_floating_point() else v + int(by * 10) for k, v in state.items()}

    for source, target, what in ((native, safe, "native -> converted"), (safe, native, "converted -> native")):
        expected = shifted(source.state_dict(), 0.5)
        target.load_state_dict(expected, strict=True)
        loaded = target.state_dict()
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{what}: {key}"


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_training_matches_native(name):
    """From the same initial state, STEPS SGD steps in float64 give the native model's losses,
    parameters (which did move), running means and variances within 1e-9 of each tensor's
    largest value, num_batches_tracked exactly, and then the same eval logits."""
    native, safe = _converted(name)
    batches = _batches(name)
    native_losses, native_logits = _train(native, batches)
    safe_losses, safe_logits = _train(safe, batches)
    assert all(torch.isfinite(loss) for loss in native_losses), "the native run diverged: a weaker test"
    for step, (got, expected) in enumerate(zip(safe_losses, native_losses)):
        _assert_close(got, expected, f"loss at step {step}")
    safe_state, native_state = safe.state_dict(), native.state_dict()
    assert not torch.equal(native_state[next(iter(native_state))], _native(name).state_dict()[next(iter(native_state))])
    for key, value in native_state.items():
        _assert_close(safe_state[key], value, key)
    tracked = [v for k, v in safe_state.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == STEPS for v in tracked)
    _assert_close(safe_logits, native_logits, "eval logits")


def test_a_subclass_inside_a_real_model_is_named_and_the_rest_converted():
    """resnet18 with one of its batch norms replaced by MyBN (holding that layer's state): the
    conversion warns once, naming "1 MyBN", at this file's line; MyBN stays (the same object) and
    the other 19 batch norms are guarded; report() marks only MyBN's row unguarded; the model
    still trains a step."""
    model = copy.deepcopy(_native("tv_resnet18"))
    mine = MyBN(64, dtype=torch.float64)
    mine.load_state_dict(model.layer1[0].bn1.state_dict())
    model.layer1[0].bn1 = mine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_safebn.convert_model(model)
    relevant = [w for w in caught if "unguarded" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert "left batch norms unguarded: 1 MyBN." in str(relevant[0].message)
    assert relevant[0].filename == __file__
    assert model.layer1[0].bn1 is mine and type(mine) is MyBN
    assert _count(model) == 20 and _count(model, _SafeBatchNormMixin) == 19
    rows = torch_safebn.report(model).rows
    assert [row["module"] for row in rows if not row["guarded"]] == ["layer1.0.bn1"]
    assert sum(row["guarded"] for row in rows) == 19
    losses, _ = _train(model, _batches("tv_resnet18"))
    assert all(torch.isfinite(loss) for loss in losses)
