"""The safety semantics of DESIGN.md: every option value, every error and
its message, every guard (also with the ops called directly), bad batches
that leave nothing lost, report() and check()."""
from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_safebn
from conftest import forward_train, make_input, module_pair
from torch_safebn import DegenerateBatchError, NonFiniteError, SafeBatchNorm1d, SafeBatchNorm2d, SafetyError
from torch_safebn.contract import NUM_COUNTERS, Counter

OPS = torch.ops.safebn


def _counters(module):
    return dict(zip((c.name.lower() for c in Counter), module.safety_counters.tolist()))


def _buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "tracked" in k}


def _assert_buffers_equal(module, before):
    for key, value in _buffers(module).items():
        assert torch.equal(value, before[key]), f"{key} changed"
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{key} is not finite"


# -- construction and argument validation ------------------------------------------
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), "1e-5", True])
def test_eps_is_validated_at_construction_and_in_the_functional_form(eps):
    with pytest.raises(ValueError, match=r"eps must be positive \(a finite number > 0\), got"):
        SafeBatchNorm2d(3, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        torch_safebn.batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), "0.1"])
def test_momentum_is_validated(momentum):
    with pytest.raises(ValueError, match=r"momentum must be None .* or a number in \[0, 1\], got"):
        SafeBatchNorm2d(3, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        torch_safebn.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=momentum)


@pytest.mark.parametrize("option,value", [("on_degenerate", "skip"), ("on_nonfinite", "ignore"),
                                          ("on_single_sample", "warn_once"), ("freeze_stats", 1), ("checks", "yes")])
def test_policy_options_are_validated(option, value):
    with pytest.raises(ValueError, match=option):
        SafeBatchNorm2d(3, **{option: value})


def test_freeze_stats_needs_running_stats():
    with pytest.raises(ValueError, match="freeze_stats=True needs track_running_stats=True"):
        SafeBatchNorm2d(3, freeze_stats=True, track_running_stats=False)


def test_bad_inputs_get_native_errors_that_say_expected_and_got():
    """Each of native's classes (code that catches them keeps working), and a message that says
    what was expected, what came, and what to do."""
    bn = SafeBatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(4, 3, 5))
    with pytest.raises(RuntimeError, match=r"weight should contain 5 elements not 3: one per channel of the input "
                                           r"of shape \[4, 5, 2, 2\].*num_features"):
        bn(torch.randn(4, 5, 2, 2))
    with pytest.raises(NotImplementedError, match="not implemented for torch.int64.*floating-point input"):
        bn(torch.ones(4, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="complex64"):
        bn(torch.ones(4, 3, 2, 2, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="weight is on meta but the input is on cpu"):
        torch_safebn.batch_norm(torch.randn(4, 3), None, None, torch.ones(3, device="meta"), training=True)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        forward_train(torch.randn(4, 3), eps=0.0)  # the op checks too


@pytest.mark.parametrize("make", [np.float32, np.float64, torch.tensor], ids=["np.float32", "np.float64", "tensor"])
def test_eps_and_momentum_as_numpy_or_0d_tensor_scalars_work_as_native(make):
    native = nn.BatchNorm2d(3, eps=make(1e-3), momentum=make(0.3))
    safe = SafeBatchNorm2d(3, eps=make(1e-3), momentum=make(0.3))
    converted = torch_safebn.convert_model(copy.deepcopy(native))
    x = make_input((4, 3, 2, 2))
    for module in (safe, converted):
        torch.testing.assert_close(module(x), native(x))
        torch.testing.assert_close(module.running_var, native.running_var)
        native.running_var.fill_(1), native.running_mean.zero_()
        assert isinstance(module.eps, float) and isinstance(module.momentum, float)


def test_eps_and_momentum_set_later_are_validated_when_set():
    bn = SafeBatchNorm2d(3)
    bn.momentum = None
    bn.eps = np.float32(1e-3)
    assert bn.momentum is None and bn.eps == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="momentum must be None"):
        bn.momentum = 2.0
    with pytest.raises(ValueError, match=r"eps must be positive \(a finite number > 0\)"):
        bn.eps = 0
    assert bn.momentum is None and bn.eps == pytest.approx(1e-3), "a refused value changes nothing"


@pytest.mark.parametrize("training", [True, False])
def test_dtype_pairings_are_those_of_native(training):
    """A float32 module takes float32, float16 and bfloat16 input (autocast's pairing); float64
    input into it is refused, as native refuses it, rather than computed in mixed precision."""
    native, safe = nn.BatchNorm2d(3).train(training), SafeBatchNorm2d(3).train(training)
    for dtype in (torch.float16, torch.bfloat16):
        x = make_input((4, 3, 2, 2), dtype)
        assert safe(x).dtype == native(x).dtype == dtype
    x64 = make_input((4, 3, 2, 2), torch.float64)
    with pytest.raises(RuntimeError):
        native(x64)
    with pytest.raises(RuntimeError, match=r"does not go with an input of dtype torch.float64.*module.to\(torch.float64\)"):
        safe(x64)
    with pytest.raises(RuntimeError, match="does not go with an input of dtype torch.float32"):
        SafeBatchNorm2d(3, dtype=torch.float64)(make_input((4, 3, 2, 2)))


@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_that_require_grad_are_refused_as_native(training):
    native, safe = nn.BatchNorm2d(3).train(training), SafeBatchNorm2d(3).train(training)
    for module in (native, safe):
        module.running_mean.requires_grad_()
    x = make_input((4, 3, 2, 2))
    with pytest.raises(RuntimeError, match="running_mean"):
        native(x)
    with pytest.raises(RuntimeError, match="running_mean requires grad, but batch norm does not differentiate"):
        safe(x)
    with torch.no_grad():  # as native, only where a gradient could be taken
        safe(x)


def test_extra_repr_and_convert_model_pass_options_on():
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm1d(4)), on_degenerate="running_stats",
                                       on_single_sample="ignore", checks=False)
    assert "on_degenerate='running_stats', on_single_sample='ignore', checks=False" in repr(model[0])
    assert model[0].safety_counters is None


# -- degenerate and single-example batches ------------------------------------------------
def test_one_value_per_channel_raises_by_default_and_names_the_module():
    model = torch_safebn.convert_model(nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))))
    before = _buffers(model[0][1])
    with pytest.raises(DegenerateBatchError, match=r"'0\.1': Expected more than 1 value per channel when training, got "
                                                   r"input size torch.Size\(\[1, 4\]\).*drop_last=True"):
        model(torch.randn(1, 3))
    assert issubclass(DegenerateBatchError, ValueError) and issubclass(DegenerateBatchError, SafetyError)
    _assert_buffers_equal(model[0][1], before)


def test_on_degenerate_running_stats_normalizes_with_them_and_leaves_them():
    native, safe = module_pair(4, 2)
    safe = torch_safebn.convert_model(copy.deepcopy(native), on_degenerate="running_stats")
    with torch.no_grad():
        safe.running_mean.uniform_()
        native.running_mean.copy_(safe.running_mean)
    before = _buffers(safe)
    x = torch.randn(1, 4)
    with pytest.warns(RuntimeWarning, match="normalized with the running statistics"):
        y = safe(x)
    torch.testing.assert_close(y, native.eval()(x))
    _assert_buffers_equal(safe, before)
    assert _counters(safe)["degenerate_batches"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        safe(x)
    assert len(caught) == 1  # one per call
    assert _counters(safe)["degenerate_batches"] == 2
    no_stats = SafeBatchNorm1d(4, on_degenerate="running_stats", track_running_stats=False)
    with pytest.raises(DegenerateBatchError, match="needs track_running_stats=True"):
        no_stats(x)


@pytest.mark.parametrize("policy", ["warn", "ignore", "raise"])
def test_on_single_sample(policy):
    bn = SafeBatchNorm2d(2, on_single_sample=policy)
    x = torch.randn(1, 2, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if policy == "raise":
            with pytest.raises(DegenerateBatchError, match=r"single example \(input shape \[1, 2, 3, 3\]\)"):
                bn(x)
        else:
            bn(x)
            bn(x)
    messages = [str(w.message) for w in caught if "single example" in str(w.message)]
    assert len(messages) == (2 if policy == "warn" else 0)  # once per call
    assert _counters(bn)["single_sample_batches"] == (1 if policy == "raise" else 2)
    assert bn.num_batches_tracked.item() == (0 if policy == "raise" else 2)


def test_a_model_warns_once_per_call_at_the_line_that_called_it():
    """A batch of one example through a library's model (torchvision's resnet18, 20 batch norms)
    gives one warning for the call, which names the first batch norm, says how many saw it and is
    attributed to the line that called the model, not to the library's code; Python's default
    filter shows it once for a loop."""
    torchvision = pytest.importorskip("torchvision")
    model = torch_safebn.convert_model(torchvision.models.resnet18())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(1, 3, 64, 64)); line = sys._getframe().f_lineno  # noqa: E702 (the same line)
        model(torch.randn(1, 3, 64, 64))
    ours = [w for w in caught if "single example" in str(w.message)]
    assert len(ours) == 2, [str(w.message)[:60] for w in ours]
    assert all("'bn1'" in str(w.message) and "(20 batch norms of the model reported it in this call" in str(w.message)
               for w in ours)
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line), (__file__, line + 1)]
    assert all(row["single_sample_batches"] == 2 for row in torch_safebn.report(model).rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            model(torch.randn(1, 3, 64, 64))
    assert len([w for w in caught if "single example" in str(w.message)]) == 1


def test_a_call_warns_at_its_end_even_when_it_raises():
    """A call that warned and then raised (the second batch norm, whose input holds NaN) still gives
    its warning, and leaves no profile hook."""
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NonFiniteError, match="'2'"):
            model(torch.randn(1, 3, 4))
    ours = [str(w.message) for w in caught if "single example" in str(w.message)]
    assert len(ours) == 1 and "'0'" in ours[0] and "(2 batch norms of the model" in ours[0]
    assert sys.getprofile() is None


def test_a_module_called_twice_in_a_call_counts_once():
    bn = torch_safebn.SafeBatchNorm1d(3)
    model = torch_safebn.convert_model(nn.Sequential(bn, nn.Conv1d(3, 3, 1), bn))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(1, 3, 4))
    ours = [str(w.message) for w in caught if "single example" in str(w.message)]
    assert len(ours) == 1 and "batch norms of the model" not in ours[0]


def test_an_error_of_the_call_is_not_replaced_by_a_warning_made_an_error():
    """Under warnings-as-errors, a call that raises raises its own error, not the warning."""
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError):
            model(torch.randn(1, 3, 4))
    assert sys.getprofile() is None


def test_warnings_as_errors_raise_at_the_call():
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="2 batch norms of the model"):
            model(torch.randn(1, 3, 4))
    assert sys.getprofile() is None


# -- non-finite values ------------------------------------------------------------------
def _poisoned(shape=(4, 3, 2, 2), channel=1, value=float("nan")):
    x = make_input(shape)
    x[(0, channel) + (0,) * (len(shape) - 2)] = value
    return x


def test_nonfinite_raise_names_module_step_shape_and_what_was_found():
    model = torch_safebn.convert_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    model(make_input((4, 3, 2, 2)))
    before = _buffers(model[1])
    with pytest.raises(NonFiniteError) as info:
        model[1](_poisoned())
    text = str(info.value)
    assert "SafeBatchNorm2d(3) '1' at training step 1" in text and "[4, 3, 2, 2]" in text
    assert "mean in 1 channel, variance in 1 channel" in text and "were not updated" in text
    assert "lower the learning rate" in text and isinstance(info.value, FloatingPointError)
    _assert_buffers_equal(model[1], before)
    counts = _counters(model[1])
    assert counts["skipped_updates"] == 1 and counts["nonfinite_events"] == 1 and counts["batches"] == 2
    torch_safebn.check(model)  # raised already by the forward: not raised again


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_nonfinite_warn_and_skip_keep_training(policy):
    bn = SafeBatchNorm2d(3, on_nonfinite=policy)
    before = _buffers(bn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(_poisoned())
        bn(_poisoned(value=float("inf")))
    assert len([w for w in caught if "non-finite" in str(w.message)]) == (1 if policy == "warn" else 0)  # per module
    _assert_buffers_equal(bn, before)
    assert _counters(bn)["nonfinite_events"] == 2
    torch_safebn.check(bn)  # only "raise" policies raise in check()


def test_nonfinite_weight_or_bias_blocks_the_update():
    bn = SafeBatchNorm2d(3)
    with torch.no_grad():
        bn.bias[2] = float("inf")
    before = _buffers(bn)
    with pytest.raises(NonFiniteError, match="bias in 1 channel"):
        bn(make_input((4, 3, 2, 2)))
    _assert_buffers_equal(bn, before)


# -- bad batches lose nothing, and the next good batch updates normally ---------------------
BAD_BATCHES = {
    "one_nan": lambda: _poisoned(),
    "one_inf": lambda: _poisoned(value=float("inf")),
    "all_nan": lambda: torch.full((4, 3, 2, 2), float("nan")),
    "float16_overflow": lambda: (make_input((4, 3, 2, 2), scale=6e4)).half(),
    "one_value_per_channel": lambda: torch.randn(1, 3, 1, 1),
    "empty": lambda: torch.randn(0, 3, 2, 2),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_bad_batch_changes_no_buffer_and_the_next_good_batch_matches_native(name):
    native, safe = module_pair(3, 4, momentum=None)  # momentum=None: num_batches_tracked matters
    safe = torch_safebn.convert_model(copy.deepcopy(native), on_nonfinite="skip")
    good = make_input((4, 3, 2, 2), seed=3)
    native(good)
    safe(good)
    if name == "float16_overflow":
        native.half()
        safe.half()
        good = good.half()
    before = _buffers(safe)
    try:
        safe(BAD_BATCHES[name]())
    except DegenerateBatchError:
        assert name == "one_value_per_channel"
    _assert_buffers_equal(safe, before)
    native(good)
    safe(good)
    tol = dict(atol=1e-2, rtol=1e-2) if name == "float16_overflow" else {}
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(safe, key), getattr(native, key), **tol, msg=key)


def test_constant_channel_is_finite_and_counted_as_low_variance():
    native, safe = module_pair(3, 4)
    x = make_input((4, 3, 2, 2))
    x[:, 1] = 5.0
    y = safe(x)
    # The constant channel's exact output is its bias (native's is off by its
    # rounding of the mean, times 1/sqrt(eps)); the other channels match native.
    assert torch.equal(y[:, 1], safe.bias[1].detach().expand_as(y[:, 1]))
    torch.testing.assert_close(y[:, [0, 2]], native(x)[:, [0, 2]])
    assert _counters(safe)["low_variance_channels"] == 1
    torch.testing.assert_close(safe.running_var, native.running_var)


# -- the guards inside the ops, called directly -----------------------------------------------
def test_update_op_with_one_value_per_channel_never_writes_nan():
    x = torch.randn(1, 3)
    _, mean, invstd = forward_train(x)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    OPS.update_running_stats(rm, rv, nbt, counters, mean, invstd, None, None, 1, 1e-5, 0.1)
    assert torch.equal(rv, torch.ones(3)) and nbt.item() == 0
    assert counters[Counter.SKIPPED_UPDATES] == 1
    # native writes 0/0 into the running variance here
    native_rv = torch.ones(3)
    torch.batch_norm(x, None, None, torch.zeros(3), native_rv, True, 0.1, 1e-5, False)
    assert torch.isnan(native_rv).all()


def test_update_op_skips_a_nonfinite_batch_whole():
    rm, rv = torch.zeros(3), torch.ones(3)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    mean = torch.tensor([0.5, float("nan"), 0.5])
    OPS.update_running_stats(rm, rv, None, counters, mean, torch.ones(3), None, None, 10, 1e-5, 0.1)
    assert torch.equal(rm, torch.zeros(3)), "no channel is updated, finite ones included"
    assert counters[Counter.NONFINITE_EVENTS] == 1 and counters[Counter.BAD_MEAN_CHANNELS] == 1


@pytest.mark.parametrize("field,value,found", [("running_var", -1.0, "variance in 1 channel"),
                                               ("running_mean", float("nan"), "mean in 1 channel"),
                                               ("weight", float("inf"), "weight in 1 channel")])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_eval_flags_invalid_statistics(field, value, found, grad):
    bn = SafeBatchNorm2d(3).eval()
    with torch.no_grad():
        getattr(bn, field)[1] = value
    with pytest.raises(NonFiniteError, match=f"in eval mode.*{found}"), torch.set_grad_enabled(grad):
        bn(make_input((2, 3, 2, 2)))
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64)
    OPS.batch_norm_eval(make_input((2, 3)), bn.weight.detach(), None, bn.running_mean, bn.running_var, counters, bn.eps)
    assert counters[Counter.NONFINITE_EVENTS] == 1 and counters[Counter.EVENT_IN_TRAINING] == 0


class _OpsCalled(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "safebn":
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_each_call_is_one_op_each_way(training, checks):
    """One dispatcher call into C++ per forward (statistics, output, guarded
    update or check together) and one per backward, with or without checks."""
    bn = SafeBatchNorm2d(3, checks=checks).train(training)
    x = make_input((2, 3, 4, 4)).requires_grad_()
    with _OpsCalled() as called:
        y = bn(x)
    assert called.names == ["safebn::forward_train" if training else "safebn::batch_norm_eval"]
    with _OpsCalled() as called:
        y.sum().backward()
    assert called.names == ["safebn::backward"]
    with torch.no_grad(), _OpsCalled() as called:
        bn(x)
    assert len(called.names) == 1


# -- freeze_stats and checks=False ---------------------------------------------------------
def test_freeze_stats_uses_running_stats_in_training_and_survives_train():
    native, _ = module_pair(3, 4)
    with torch.no_grad():
        native.running_mean.uniform_()
    safe = torch_safebn.convert_model(copy.deepcopy(native), freeze_stats=True)
    safe.train()
    before = _buffers(safe)
    x = make_input((4, 3, 2, 2)).requires_grad_()
    y = safe(x)
    torch.testing.assert_close(y, native.eval()(x))
    y.sum().backward()
    assert x.grad is not None and safe.weight.grad is not None
    _assert_buffers_equal(safe, before)


def test_checks_false_has_no_counters_no_guards_and_native_numbers():
    native, _ = module_pair(3, 4)
    safe = torch_safebn.convert_model(copy.deepcopy(native), checks=False)
    assert safe.safety_counters is None
    x = make_input((4, 3, 2, 2))
    torch.testing.assert_close(safe(x), native(x))
    torch.testing.assert_close(safe.running_var, native.running_var)
    safe(_poisoned())  # no error, no guard: poisoned exactly like native
    native(_poisoned())
    assert torch.isnan(safe.running_mean[1]) and torch.isnan(native.running_mean[1])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        safe(torch.randn(1, 3, 1, 1))
    assert torch_safebn.report(safe).rows[0]["batches"] == "-"


# -- report() and check() -------------------------------------------------------------------
def test_report_has_a_row_per_module_with_qualified_names_and_a_table():
    model = torch_safebn.convert_model(nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.BatchNorm2d(4)), on_nonfinite="skip")
    model(make_input((4, 3, 2, 2)))
    model[1](_poisoned((4, 4, 2, 2)))
    report = torch_safebn.report(model)
    assert [r["module"] for r in report.rows] == ["0.1", "1"]
    assert report.rows[0]["batches"] == 1 and report.rows[1]["batches"] == 2
    assert report.rows[1]["skipped_updates"] == 1 and report.rows[1]["nonfinite_events"] == 1
    table = str(report).splitlines()
    assert table[0].split()[:4] == ["module", "class", "batches", "skipped_updates"]
    assert table[3].split()[:5] == ["1", "SafeBatchNorm2d", "2", "1", "1"]


def test_check_raises_what_no_forward_saw():
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm1d(3)))
    model(torch.randn(4, 3))
    torch_safebn.check(model)
    with torch.no_grad():
        model[0].weight[0] = float("nan")  # e.g. the optimizer's last step
    with pytest.raises(NonFiniteError, match="'0': weight hold NaN/Inf now"):
        torch_safebn.check(model)


def test_functional_form_raises_at_once():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(NonFiniteError, match="batch_norm"):
        torch_safebn.batch_norm(_poisoned((4, 3)), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3))
    out = torch_safebn.batch_norm(_poisoned((4, 3)), rm, rv, training=True, on_nonfinite="skip")
    assert torch.isnan(out[:, 1]).all() and torch.equal(rm, torch.zeros(3))


def test_check_names_the_first_event_no_forward_reported():
    """Events counted under 'skip' are described from the first; once the policy is 'raise',
    check() raises for that one (its step, its channels) and says how many followed."""
    bn = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), on_nonfinite="skip")
    for step in range(5):
        bad = {1: _poisoned(channel=2), 3: _poisoned(channel=0, value=float("inf"))}.get(step)
        bn(bad if bad is not None else make_input((4, 3, 2, 2), seed=step))
    torch_safebn.check(bn)  # 'skip': nothing to raise
    torch_safebn.convert_model(bn, on_nonfinite="raise")
    with pytest.raises(NonFiniteError, match=r"'0' at training step 1 \(the 2nd batch it saw\).*mean in 1 channel"
                                             r".*1 later event followed it unreported"):
        torch_safebn.check(bn)
    torch_safebn.check(bn)  # raised once


def test_convert_model_applies_new_options_to_converted_modules():
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(2)), checks=False)
    assert model[0].safety_counters is None
    torch_safebn.convert_model(model, checks=True, on_single_sample="ignore")
    assert model[0].policy.checks and model[0].policy.on_single_sample == "ignore"
    assert model[0].safety_counters.tolist() == [0] * NUM_COUNTERS
    model[0](make_input((4, 3, 2, 2)))
    assert torch_safebn.report(model).rows[0]["batches"] == 1
    with pytest.raises(ValueError, match="freeze_stats=True needs track_running_stats=True"):
        torch_safebn.convert_model(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), freeze_stats=True)


@pytest.mark.parametrize("options", [{"on_nonfinite": "ignore"}, {"checks": "yes"}, {"on_nan": "raise"}])
def test_convert_model_refuses_bad_options_even_without_a_batch_norm(options):
    with pytest.raises((ValueError, TypeError)):
        torch_safebn.convert_model(nn.Sequential(nn.Linear(2, 2)), **options)
