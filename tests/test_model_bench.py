"""torch-safebn bench --model: training steps of a whole model, native and
converted, eager and compiled. Performance is measured, never asserted: these
runs take one timed step of tiny models on tiny images and check what comes
out: the rows, the batch-norm counts, the table, the PNG, and the errors."""
import contextlib
import io
import json
import pathlib
import runpy
import sys

import pytest
import torch
from torch import nn

from torch_safebn.tools import model_bench
from torch_safebn.tools.cli import main
from torch_safebn.tools.text import WIDTH

FLOAT32 = (torch.float32, torch.float32)


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory):
    """torchvision's resnet18 through the command: 32 x 32 images, batch 2, one timed step each."""
    pytest.importorskip("torchvision")
    folder = tmp_path_factory.mktemp("model")
    argv = ["bench", "--model", "resnet18", "--device", "cpu", "--image-size", "32", "--batch-size", "2",
            "--variants", "eager", "--min-run-time", "0", "--json", str(folder / "m.json"), "--plot", str(folder / "m.png")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    return json.loads((folder / "m.json").read_text()), (folder / "m.png").read_bytes(), out.getvalue()


def test_model_rows_follow_their_documented_fields(resnet18_run):
    result, _, _ = resnet18_run
    assert result["format"] == model_bench.FORMAT
    assert [(row["impl"], row["variant"]) for row in result["rows"]] == [("native", "eager"), ("converted", "eager")]
    for row in result["rows"]:
        assert list(row) == list(model_bench.ROW_FIELDS)
        for field, (kind, _) in model_bench.ROW_FIELDS.items():
            assert isinstance(row[field], kind), (field, row[field])
        assert (row["model"], row["batch_size"], row["image_size"]) == ("resnet18", 2, 32)
        assert row["steps"] >= 1 and row["first_step_s"] > 0
        assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
    native, converted = result["rows"]
    assert native["speedup_vs_native"] == native["speedup_vs_best_peer"] == 1.0
    assert converted["speedup_vs_native"] == pytest.approx(native["median_ms"] / converted["median_ms"])


def test_model_result_counts_the_guarded_batch_norms(resnet18_run):
    result, _, _ = resnet18_run
    model = result["model"]
    assert (model["name"], model["class"]) == ("resnet18", "ResNet")
    assert model["parameters"] == sum(p.numel() for p in model_bench.create_model("resnet18").parameters())
    assert model["batch_norms"] == {"total": 20, "guarded": 20, "left_native": {}}
    assert model["convert_warnings"] == []


def test_model_table_and_plot(resnet18_run):
    result, png, out = resnet18_run
    lines = out.splitlines()
    assert lines[0].startswith("Model benchmark: resnet18 (ResNet, 11.7 M parameters)")
    assert "20 batch norms, all guarded by torch_safebn" in out
    assert max(map(len, lines)) <= WIDTH
    assert "eager contiguous float32" in lines
    assert [line.split()[0] for line in lines[lines.index("eager contiguous float32") + 1:][:2]] == ["native",
                                                                                                    "converted"]
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def _tiny_classifier() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))


def test_compile_variant_compiles_every_model_outside_the_timing(monkeypatch):
    """The compile path with torch.compile's aot_eager backend: inductor's C++ compilation takes a minute here.
    Compiled, the converted model runs twice: lowered to ATen ops, and with its fused ops kept."""
    compiled, graphs = [], []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return aot_eager(gm, example_inputs)

    def compile_model(model):
        compiled.append(model)
        return torch.compile(model, backend=recording)

    monkeypatch.setattr(model_bench, "compile_model", compile_model)
    phases = []
    plan = model_bench.configs(["eager", "compile"], ["channels_last"], [FLOAT32, (torch.bfloat16, torch.float32)])
    result = model_bench.run("tiny", _tiny_classifier(), plan, "cpu", threads=1, batch_size=2, image_size=8,
                             min_run_time=0, on_phase=phases.append)
    assert len(compiled) == 3 * 2  # native, converted and converted-kernels, in each compile config
    assert [type(m.get_submodule("1")).__name__ for m in compiled[:3]] == ["BatchNorm2d"] + ["SafeBatchNorm2d"] * 2
    fused = ["safebn.batch_norm_train.default" in graph for graph in graphs]
    lowered = ["safebn.update_running_stats.default" in graph for graph in graphs]
    assert fused == [False, False, True] * 2 and lowered == [False, True, False] * 2
    assert [(r["variant"], r["dtype"], r["impl"]) for r in result["rows"]] == [
        (variant, dtype, impl) for variant in ("eager", "compile") for dtype in ("float32", "bfloat16")
        for impl in model_bench.impls_for(model_bench.Config(variant, "contiguous", torch.float32, torch.float32))]
    assert len(result["rows"]) == 2 * 2 + 2 * 3
    assert "compile channels_last float32: native, first step (compiling)" in phases
    for row in result["rows"]:
        best = min(r["median_ms"] for r in result["rows"] if r["impl"] == "native" and r["dtype"] == row["dtype"])
        assert row["speedup_vs_best_peer"] == pytest.approx(best / row["median_ms"])
    assert result["model"]["batch_norms"] == {"total": 1, "guarded": 1, "left_native": {}}


def test_batch_norms_left_native_are_counted_by_class():
    class OwnBatchNorm(nn.BatchNorm2d):  # a subclass convert_model does not know
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), OwnBatchNorm(4), nn.Flatten(), nn.LazyLinear(3))
    import torch_safebn

    with pytest.warns(RuntimeWarning, match="OwnBatchNorm"):
        converted = torch_safebn.convert_model(model)
    counts = model_bench.count_batch_norms(converted)
    assert counts == {"total": 2, "guarded": 1, "left_native": {"OwnBatchNorm": 1}}


def test_timm_models_are_created_untrained_and_counted():
    pytest.importorskip("timm")
    model = model_bench.create_model("timm:efficientnet_b0")
    import torch_safebn

    counts = model_bench.count_batch_norms(torch_safebn.convert_model(model))
    assert counts == {"total": 49, "guarded": 49, "left_native": {}}


@pytest.mark.parametrize("option, complaint", [
    (["--model", "resnet5"], "torchvision has no classification model 'resnet5'; similar: resnet50"),
    (["--model", "timm:efficientnet_b99"], "timm has no model 'efficientnet_b99'; similar: efficientnet_b"),
    (["--model", "resnet18", "--passes", "fwd"], "--passes does not apply to the model benchmark"),
    (["--model", "resnet18", "--variants", "jit"], "unknown variant 'jit'"),
    (["--model", "resnet18", "--dtypes", "float16"], "float16 needs a GradScaler"),
    (["--preset", "quick", "--batch-size", "4", "--image-size", "8"],
     "--batch-size, --image-size do not apply to the layer benchmark"),
])
def test_model_bench_rejects_bad_options_clearly(option, complaint):
    pytest.importorskip("timm")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", *option])
    assert complaint in str(exit_info.value.code)


def test_a_missing_optional_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "timm:efficientnet_b0"])
    assert "needs timm, which is not installed: pip install 'torch_safebn[models]'" in str(exit_info.value.code)


def test_model_suite_runs_the_three_cpu_models_and_keeps_every_run():
    """benchmarks/model_suite.py: the committed model results' settings, on 2 threads set explicitly,
    the first run's files named as before and every later run's apart, and the summary's ratios
    read from the run's own JSON."""
    suite = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "benchmarks" / "model_suite.py"))
    assert set(suite["MODELS"]) == {"resnet18", "timm:efficientnet_b0", "timm:mobilenetv3_large_100"}
    for model in suite["MODELS"]:
        for run in (1, 2):
            argv = suite["options"](model, run)
            options = dict(zip(argv[1::2], argv[2::2]))
            assert options["--model"] == model and options["--threads"] == "2" and options["--device"] == "cpu"
            assert (options["--batch-size"], options["--image-size"]) == ("8", "96")
            assert options["--variants"] == "eager,compile"
            name = model.removeprefix("timm:")
            assert options["--json"].endswith(f"model-{name}-cpu.json" if run == 1 else f"model-{name}-cpu-run2.json")
            assert ("--plot" in options) == (run == 1)


def test_model_suite_summary_is_every_runs_ratio_over_native(tmp_path, monkeypatch):
    suite = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "benchmarks" / "model_suite.py"))
    rows = [{"variant": variant, "impl": impl, "median_ms": ms} for variant, impl, ms in
            [("eager", "native", 100.0), ("eager", "converted", 90.0), ("compile", "native", 80.0),
             ("compile", "converted", 84.0), ("compile", "converted-kernels", 88.0)]]
    path = tmp_path / "model-resnet18-cpu.json"
    path.write_text(json.dumps({"machine": {"device": "cpu"}, "created": "now", "rows": rows}))
    monkeypatch.setitem(suite["ratios"].__globals__, "RESULTS", str(tmp_path))
    summary = suite["ratios"]("resnet18", 1)["variants"]
    assert summary["eager"]["over_native"] == {"native": 1.0, "converted": 0.9}
    assert summary["compile"]["over_native"] == {"native": 1.0, "converted": 1.05, "converted-kernels": 1.1}
