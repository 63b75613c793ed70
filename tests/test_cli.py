"""The torch-safebn command: info, check, bench (JSON and PNG), demo.

Performance is measured, never asserted: the bench tests time tiny shapes for a
few milliseconds and check only the shape of what comes out."""
import contextlib
import io
import itertools
import json
import math
import pathlib
import runpy
import sys

import pytest
import torch

import torch_safebn
from torch_safebn import functional
from torch_safebn.tools import layer_bench, selfcheck
from torch_safebn.tools.cli import main
from torch_safebn.tools.layer_table import format_compact_table

TINY_SHAPES = ((4, 3, 5, 6), (8, 4))


def test_info_names_versions_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert torch_safebn.backend() in out
    assert torch.backends.cpu.get_cpu_capability() in out


def test_python_dash_m_runs_the_same_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m torch_safebn", "info"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("torch_safebn", run_name="__main__")
    assert exit_info.value.code == 0
    assert "backend" in capsys.readouterr().out


def test_check_passes_on_this_build(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for kind in ("parity", "gradcheck", "opcheck"):
        assert f"PASS  {kind}" in out
    assert "FAIL" not in out


def _scaled_output(*args, **kwargs):
    return functional.batch_norm(*args, **kwargs) * 1.01


def _contiguous_output(*args, **kwargs):
    return functional.batch_norm(*args, **kwargs).contiguous()


def _running_var_off(input, running_mean, running_var, *args, **kwargs):
    output = functional.batch_norm(input, running_mean, running_var, *args, **kwargs)
    if running_var is not None:
        running_var.mul_(1.01)
    return output


def test_check_exits_non_zero_for_a_broken_batch_norm(capsys):
    assert selfcheck.main(batch_norm=_scaled_output, devices=[torch.device("cpu")]) != 0
    out = capsys.readouterr().out
    assert "FAIL  parity" in out
    assert "output against float64: Tensor-likes are not close" in out


@pytest.mark.parametrize("broken, complaint", [(_contiguous_output, "is not channels_last"), (_running_var_off, "running_var")])
def test_parity_catches_each_kind_of_fault(broken, complaint):
    # Parity runs first; stop before the slower gradcheck and opcheck.
    results = itertools.takewhile(lambda r: r.check == "parity", selfcheck.run_checks(broken, [torch.device("cpu")]))
    errors = [r.error for r in results if not r.passed]
    assert errors and all(complaint in error for error in errors)


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    """One tiny bench run through the CLI, shared by the tests that read its output."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "quick.json", folder / "quick.png"
    argv = [
        "bench", "--device", "cpu", "--preset", "quick", "--dtypes", "float32,bfloat16/bfloat16",
        "--peers", "native", "--threads", "1", "--min-run-time", "0.002",
        "--json", str(json_path), "--plot", str(png_path),
    ]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.setitem(layer_bench.PRESETS, "quick", TINY_SHAPES)
        patch.setattr(layer_bench, "COPY_BYTES", 2**22)  # the real 256 MiB costs seconds of page faults
        assert main(argv) == 0
    return json.loads(json_path.read_text()), png_path, out.getvalue()


def test_bench_prints_a_table(bench_result):
    _, _, out = bench_result
    assert "vs best peer" in out
    assert "4x3x5x6" in out and "channels_last" in out


def test_bench_json_follows_its_documented_fields(bench_result):
    result, _, _ = bench_result
    assert result["format"] == layer_bench.FORMAT
    assert result["machine"]["copy_gb_per_s"] > 0
    assert result["machine"]["threads"] == 1
    # channels_last exists for the 4-D shape only: 3 layouts x shapes, 2 dtypes, 4 passes, 3 impls
    assert len(result["rows"]) == 3 * 2 * 4 * 3
    for row in result["rows"]:
        assert set(row) == set(layer_bench.ROW_FIELDS)
        for field, (kind, _) in layer_bench.ROW_FIELDS.items():
            assert isinstance(row[field], kind), (field, row[field])
        numel = math.prod(row["shape"])
        itemsize = getattr(torch, row["dtype"]).itemsize
        assert row["bytes"] == layer_bench.ACTIVATION_PASSES[row["pass"]] * numel * itemsize
        assert row["pct_copy_bandwidth"] == pytest.approx(100 * row["gb_per_s"] / row["copy_gb_per_s"])
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["median_us"] / 1e3)
        if row["impl"] == "native":
            assert row["speedup_vs_native"] == row["speedup_vs_best_peer"] == 1.0
    # One copy, timed in turns with a workload's implementations, for all of its rows.
    for rows in layer_bench.workload_groups(result["rows"]).values():
        assert len({row["copy_gb_per_s"] for row in rows.values()}) == 1
    assert {row["impl"] for row in result["rows"]} == {"safebn", "safebn-nochecks", "native"}
    assert {(row["dtype"], row["param_dtype"]) for row in result["rows"]} == {
        ("float32", "float32"), ("bfloat16", "bfloat16"),
    }


def test_bench_plot_is_a_png(bench_result):
    _, png_path, _ = bench_result
    data = png_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_compact_table_names_the_best_peer(bench_result):
    result, _, _ = bench_result
    lines = format_compact_table(result).splitlines()
    assert lines[2].split() == ["case", "pass", "safebn", "us", "best", "peer", "peer", "us", "speed-up", "safebn",
                                "GB/s", "%", "of", "copy", "checks", "cost"]
    rows = [line for line in lines if line.startswith(("4x3x5x6", "8x4"))]
    assert len(rows) == len(layer_bench.workload_groups(result["rows"]))
    assert all(" native " in row for row in rows)  # the only peer


def test_bench_times_the_backward_alone_under_torch_compile(tmp_path, monkeypatch):
    """The bwd pass calls backward again and again on one graph, which
    torch.compile's donated buffers would refuse; the implementations take
    turns, and none may update buffers another's graph saved."""
    monkeypatch.setattr(layer_bench, "COPY_BYTES", 2**22)
    json_path = tmp_path / "bwd.json"
    argv = ["bench", "--device", "cpu", "--shapes", "4x3x5x6", "--layouts", "contiguous", "--passes", "bwd",
            "--dtypes", "float32", "--peers", "native,compile", "--min-run-time", "0.001", "--json", str(json_path)]
    assert main(argv) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [row["impl"] for row in rows] == ["safebn", "safebn-nochecks", "native", "compile"]


def test_bench_measures_only_what_it_is_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layer_bench, "COPY_BYTES", 2**22)
    json_path = tmp_path / "one.json"
    argv = ["bench", "--device", "cpu", "--shapes", "4x3x5x6,6x2", "--layouts", "channels_last", "--passes", "eval",
            "--dtypes", "float32", "--peers", "none", "--min-run-time", "0.001", "--json", str(json_path)]
    assert main(argv) == 0
    rows = json.loads(json_path.read_text())["rows"]
    # channels_last has no 2-D form: only the 4-D shape is measured
    assert [(r["impl"], r["shape"], r["layout"], r["pass"]) for r in rows] == [
        (impl, [4, 3, 5, 6], "channels_last", "eval") for impl in ("safebn", "safebn-nochecks")
    ]
    assert all(r["speedup_vs_best_peer"] is None and r["speedup_vs_native"] is None for r in rows)
    assert "4x3x5x6" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option, complaint",
    [
        (["--peers", "cudnn"], "unknown peer"),
        (["--peers", "native-nocudnn"], "runs on cuda only"),
        (["--shapes", "4x"], "sizes joined by 'x'"),
        (["--layouts", "nhwc"], "unknown layout"),
        (["--passes", "forward"], "unknown pass"),
        (["--dtypes", "int8"], "not a floating-point torch dtype"),
    ],
)
def test_bench_rejects_bad_options_clearly(option, complaint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", "--min-run-time", "0.001", *option])
    assert exit_info.value.code != 0
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert complaint in message


def test_demo_hands_its_arguments_to_the_demo_module(monkeypatch):
    from torch_safebn.tools import demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv: seen.append(argv) or 0)
    assert main(["demo", "--steps", "3"]) == 0
    assert seen == [["--steps", "3"]]


def test_benchmarks_readme_documents_every_json_field():
    readme = (pathlib.Path(__file__).parents[1] / "benchmarks" / "README.md").read_text()
    for field in layer_bench.ROW_FIELDS:
        assert f"| `{field}` |" in readme


def test_cpu_suite_runs_issue_5s_workloads():
    """benchmarks/cpu_suite.py: issue 5's shapes, dtypes, layouts and passes against both peers, on 2
    threads set explicitly (the Timer's default is 1)."""
    assert set(layer_bench.PRESETS["full"]) == {
        (32, 64, 56, 56), (64, 64, 112, 112), (64, 512, 7, 7), (8, 3, 224, 224),
        (128, 256, 14, 14), (8192, 512), (4, 32, 16, 32, 32),
    }
    suite = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "benchmarks" / "cpu_suite.py"))
    options = dict(zip(suite["OPTIONS"][1::2], suite["OPTIONS"][2::2]))
    assert options["--preset"] == "full" and options["--threads"] == "2"
    assert set(options["--dtypes"].split(",")) == {"float32", "bfloat16"}
    assert set(options["--layouts"].split(",")) == {"contiguous", "channels_last"}
    assert set(options["--passes"].split(",")) == {"fwd", "bwd", "fwdbwd", "eval"}
    assert set(options["--peers"].split(",")) == {"native", "compile"}
