"""PyTorch's own batch-norm test data, installed with torch, run against
torch_safebn: the OpInfo samples of nn.functional.batch_norm (what PyTorch's
test_ops.py runs) against torch_safebn.batch_norm, and the ModuleInfo inputs
and error inputs of nn.BatchNorm1d/2d/3d (test_modules.py's) against the
converted modules. Where they differ from native, it is a safety behaviour
README documents, and the test says which."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import torch_safebn
from torch_safebn.modules import SAFE_FOR_NATIVE

TIGHT = {"atol": 1e-10, "rtol": 1e-10}
BATCH_NORM_OPINFO = next(op for op in op_db if op.name == "nn.functional.batch_norm")
MODULE_INFOS = [info for info in module_db if info.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                                                  torch.nn.BatchNorm3d)]


def _cloned(values):
    return [v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v for v in values]


def _grads(tensors):
    return [t.grad for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("index", range(len(list(BATCH_NORM_OPINFO.sample_inputs("cpu", torch.float64)))))
def test_opinfo_samples_of_functional_batch_norm(index):
    sample = list(BATCH_NORM_OPINFO.sample_inputs("cpu", torch.float64, requires_grad=True))[index]
    kwargs = dict(sample.kwargs)
    if kwargs.get("momentum", 0.1) < 0 and kwargs.get("training"):  # README: momentum None or in [0, 1]
        with pytest.raises(ValueError, match="momentum must be None .* or a number in \\[0, 1\\]"):
            torch_safebn.batch_norm(sample.input, *sample.args, **kwargs)
        return
    native_args, safe_args = _cloned([sample.input, *sample.args]), _cloned([sample.input, *sample.args])
    expected = F.batch_norm(*native_args, **kwargs)
    output = torch_safebn.batch_norm(*safe_args, **kwargs)
    torch.testing.assert_close(output, expected, **TIGHT)
    for native_buffer, safe_buffer in zip(native_args[1:3], safe_args[1:3]):
        if native_buffer is not None:
            torch.testing.assert_close(safe_buffer, native_buffer, **TIGHT)  # the running statistics' update
    if expected.requires_grad and expected.numel():
        grad = torch.randn_like(expected)
        expected.backward(grad)
        output.backward(grad)
        for a, b in zip(_grads(safe_args), _grads(native_args)):
            torch.testing.assert_close(a, b, **TIGHT)


def _module_cases():
    for info in MODULE_INFOS:
        for training in (True, False):
            for index, case in enumerate(info.module_inputs_func(info, "cpu", torch.float64, True, training)):
                yield pytest.param(info, training, index, id=f"{info.module_cls.__name__}-{case.desc or index}-"
                                                           f"{'train' if training else 'eval'}")


@pytest.mark.parametrize("info,training,index", list(_module_cases()))
def test_moduleinfo_inputs_of_batch_norm(info, training, index):
    case = info.module_inputs_func(info, "cpu", torch.float64, True, training)[index]
    args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
    torch.manual_seed(0)
    native = info.module_cls(*args, **kwargs, dtype=torch.float64).train(training)
    safe = SAFE_FOR_NATIVE[info.module_cls](*args, **kwargs, dtype=torch.float64).train(training)
    safe.load_state_dict(native.state_dict())
    native_input, safe_input = _cloned(case.forward_input.args), _cloned(case.forward_input.args)
    expected, output = native(*native_input), safe(*safe_input)
    torch.testing.assert_close(output, expected, **TIGHT)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    output.backward(grad)
    torch.testing.assert_close(safe_input[0].grad, native_input[0].grad, **TIGHT)
    for (name, a), (_, b) in zip(safe.named_parameters(), native.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TIGHT, msg=name)
    state, native_state = safe.state_dict(), native.state_dict()
    assert list(state) == list(native_state)
    if training and native.track_running_stats and not native_input[0].numel():
        # README: an empty batch changes no buffer (native counts it in num_batches_tracked)
        assert state["num_batches_tracked"] == native_state["num_batches_tracked"] - 1
        del state["num_batches_tracked"], native_state["num_batches_tracked"]
    for name, value in native_state.items():
        torch.testing.assert_close(state[name], value, **TIGHT, msg=name)


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda info: info.module_cls.__name__)
def test_moduleinfo_error_inputs_of_batch_norm(info):
    """Native's class and message; README: eps is refused when the module is made, not at its
    first forward."""
    cases = info.module_error_inputs_func(info, "cpu", torch.float64, False, True)
    assert cases
    for error in cases:
        args, kwargs = error.module_error_input.constructor_input.args, error.module_error_input.constructor_input.kwargs
        with pytest.raises(error.error_type, match=error.error_regex):
            module = SAFE_FOR_NATIVE[info.module_cls](*args, **kwargs, dtype=torch.float64)
            assert error.error_on == ModuleErrorEnum.FORWARD_ERROR
            module(*error.module_error_input.forward_input.args)
