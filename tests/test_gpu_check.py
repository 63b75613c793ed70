"""benchmarks/gpu_check.py on the CPU: the order it times workloads in, how the
budget trims it, and that its correctness checks pass this build and catch a
broken op. (The GPU-only parts, graph capture and sync debug mode, run there.)"""
import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from torch_safebn.tools import layer_bench

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
_SPEC = importlib.util.spec_from_file_location("gpu_check", _PATH)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(gpu_check)

CPU = torch.device("cpu")


def test_plan_times_every_training_workload_before_the_rest():
    plan = gpu_check.timing_plan(torch.device("cuda"), quick=False)
    kinds = [(step.kind, step.workload.pass_name) for step in plan]
    training = len(gpu_check.TIMING_SHAPES) * len(gpu_check.TIMING_DTYPES) + 5 * len(gpu_check.TIMING_DTYPES)
    assert kinds[:training] == [("core", "fwdbwd")] * training  # 5 shapes in two layouts, one 2-D
    points = {(s, layout, d) for s, layout, d in gpu_check.REFERENCE_POINTS}
    assert {(w.shape, w.layout, w.dtype) for w in (step.workload for step in plan[:len(points)])} == points
    assert [step.kind for step in plan[training:training + len(points)]] == ["compile"] * len(points)
    assert {impl.name for impl in plan[0].implementations} == {"safebn", "safebn-nochecks", "native", "native-nocudnn"}
    # every workload is timed once by the core implementations and once by torch.compile
    core = [step.workload for step in plan if step.kind == "core"]
    compiled = [step.workload for step in plan if step.kind == "compile"]
    assert len(set(core)) == len(core) and sorted(map(repr, core)) == sorted(map(repr, compiled))
    assert all("native-nocudnn" not in step.label() for step in gpu_check.timing_plan(CPU, quick=True))


class _Clock(gpu_check.Clock):
    def __init__(self, left):
        super().__init__(budget_s=0)
        self._left = left

    def left(self):
        return self._left


def test_budget_skips_steps_that_do_not_fit():
    budget = gpu_check.Budget(_Clock(left=20.0), reserve_s=5.0)
    assert budget.fits("core") and not budget.fits("compile")  # the priors: 3 s and 30 s
    for seconds in (100.0, 2.0, 4.0, 6.0):
        budget.spent("compile", seconds)
    assert budget.estimate("compile") == pytest.approx(4.0)  # the last three
    assert budget.fits("compile")


def test_timings_record_what_they_skip(monkeypatch):
    monkeypatch.setattr(layer_bench, "COPY_BYTES", 2**20)
    plan = gpu_check.timing_plan(CPU, quick=True)[:2]
    result = gpu_check.run_timings(CPU, plan, 0.001, _Clock(left=0.0))
    assert result["rows"] == [] and [entry["step"] for entry in result["settings"]["skipped"]] == [
        step.label() for step in plan]
    result = gpu_check.run_timings(CPU, plan[:1], 0.001, _Clock(left=1e9))
    assert {row["impl"] for row in result["rows"]} == {"safebn", "safebn-nochecks", "native"}
    assert result["settings"]["skipped"] == [] and result["settings"]["errors"] == []


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_correctness_checks_pass_on_this_build(dtype, param_dtype):
    for training in (True, False):
        details = gpu_check.module_check(CPU, (4, 3, 5, 6), "channels_last", dtype, param_dtype, training, True, 0)
        assert set(details["errors"]) == {"output", "grad_input", "grad_weight", "grad_bias", "running_mean",
                                          "running_var"}
    details = gpu_check.op_check(CPU, (3, 4, 7), "contiguous", dtype, param_dtype, 0)
    assert details["outputs"] == 20


def test_op_check_catches_an_op_that_is_off(monkeypatch):
    ops = torch.ops.safebn

    def normalize_off(*args):
        return ops.normalize(*args) * 1.001

    monkeypatch.setattr(gpu_check, "OPS", types.SimpleNamespace(
        **{name: getattr(ops, name) for name in ("forward_train", "batch_norm_eval", "batch_stats", "backward",
                                                 "backward_reduce", "backward_elemt")},
        normalize=normalize_off))
    with pytest.raises(AssertionError, match="normalize output 0: relative error"):
        gpu_check.op_check(CPU, (3, 4, 7), "contiguous", torch.float32, torch.float32, 0)
