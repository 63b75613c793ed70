"""The torch-safebn command: info, check, bench (JSON and PNG), demo; its
--version, help and output width.

Performance is measured, never asserted: the bench tests time tiny shapes for a
few milliseconds and check only the shape of what comes out. (The host and model
benchmarks have their own test files.)"""
import argparse
import contextlib
import io
import itertools
import json
import math
import os
import pathlib
import runpy
import subprocess
import sys

import pytest
import torch

import torch_safebn
from torch_safebn import functional
from torch_safebn.tools import host_bench, layer_bench, model_bench, selfcheck
from torch_safebn.tools.cli import build_parser, main
from torch_safebn.tools.layer_table import format_compact_table
from torch_safebn.tools.text import WIDTH

TINY_SHAPES = ((4, 3, 5, 6), (8, 4))
REPOSITORY = pathlib.Path(__file__).parents[1]


def test_info_names_versions_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert torch_safebn.backend() in out
    assert torch.backends.cpu.get_cpu_capability() in out


def test_version_names_torch_safebn_torch_and_the_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split() == [
        "torch-safebn", torch_safebn.__version__, "(torch", f"{torch.__version__},", "backend", f"{torch_safebn.backend()})"]


def test_every_subcommand_and_option_has_help():
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    listed = {command.dest: command.help for command in commands._choices_actions}
    assert set(listed) == {"info", "check", "bench", "demo"} and all(listed.values())
    for name, subparser in [("torch-safebn", parser), *commands.choices.items()]:
        assert subparser.description, f"{name} has no description"
        for action in subparser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize("argv", [[], ["info"], ["check"], ["bench"], ["demo"]])
def test_help_fits_100_columns_in_a_wider_terminal(argv, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # argparse would fill it
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 3 and max(map(len, lines)) <= WIDTH


def _run_quietly_where_torch_would_warn(*args: str) -> subprocess.CompletedProcess:
    """A fresh process in which importing torch.utils.cpp_extension logs its CUDA_HOME notice:
    CUDA_HOME set, and no GPU visible."""
    env = {**os.environ, "CUDA_HOME": "/usr/local/cuda", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_info_check_and_bench_print_no_cuda_home_notice():
    notice = "No CUDA runtime is found"
    # The notice does appear here when torch.utils.cpp_extension is imported plainly...
    assert notice in _run_quietly_where_torch_would_warn("-c", "import torch.utils.cpp_extension").stderr
    # ...but not from the commands, which import it (for torch.utils.benchmark, opcheck) with it silenced.
    info = _run_quietly_where_torch_would_warn("-m", "torch_safebn", "info")
    bench = _run_quietly_where_torch_would_warn("-m", "torch_safebn", "bench", "--preset", "host", "--device", "cpu",
                                                "--passes", "eval", "--min-run-time", "0.001")
    for run in (info, bench):
        assert run.returncode == 0, run.stderr
        assert notice not in run.stderr and "cpp_extension" not in run.stderr, run.stderr


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


def test_bench_prints_a_table_within_100_columns(bench_result):
    result, _, out = bench_result
    lines = out.splitlines()
    # The heading wraps at 100 columns, where depends on the processor's name.
    assert lines[0].startswith("Layer benchmark: ") and "copy bandwidth" in " ".join(out.split())
    assert max(map(len, lines)) <= WIDTH
    header = next(line.split() for line in lines if line.startswith("pass "))
    assert header == ["pass", "safebn", "no", "checks", "native", "GB/s", "%", "copy", "vs", "peer", "checks"]
    # A heading per case, then one line per pass under it.
    assert "4x3x5x6 channels_last bfloat16" in lines and "8x4 contiguous float32" in lines
    case = lines.index("8x4 contiguous float32")
    assert [line.split()[0] for line in lines[case + 1:case + 5]] == list(layer_bench.ACTIVATION_PASSES)


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
    header = next(line for line in lines if line.startswith("case"))
    assert header.split() == ["case", "pass", "safebn", "us", "best", "peer", "peer", "us", "speed-up", "safebn",
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


def test_demo_hands_its_options_to_the_demo_module(monkeypatch):
    from torch_safebn.tools import demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda args: seen.append((args.seeds, args.lr, args.steps)) or 0)
    assert main(["demo", "--steps", "3"]) == 0
    assert seen == [(10, 0.1, 3)]


@pytest.mark.parametrize("fields", [layer_bench.ROW_FIELDS, host_bench.ROW_FIELDS, model_bench.ROW_FIELDS])
def test_benchmarks_readme_documents_every_json_field(fields):
    readme = (REPOSITORY / "benchmarks" / "README.md").read_text()
    for field in fields:
        assert f"| `{field}` |" in readme


def test_cpu_suite_runs_issue_5s_workloads_cold_and_warm():
    """benchmarks/cpu_suite.py: issue 5's shapes, dtypes, layouts and passes against both peers, on 2
    threads set explicitly (the Timer's default is 1)."""
    assert set(layer_bench.PRESETS["full"]) == {
        (32, 64, 56, 56), (64, 64, 112, 112), (64, 512, 7, 7), (8, 3, 224, 224),
        (128, 256, 14, 14), (8192, 512), (4, 32, 16, 32, 32),
    }
    suite = runpy.run_path(str(REPOSITORY / "benchmarks" / "cpu_suite.py"))
    argv = suite["options"]("cold", "full-cpu", 1)
    options = dict(zip(argv[1::2], argv[2::2]))
    assert options["--preset"] == "full" and options["--threads"] == "2"
    assert set(options["--dtypes"].split(",")) == {"float32", "bfloat16"}
    assert set(options["--layouts"].split(",")) == {"contiguous", "channels_last"}
    assert set(options["--passes"].split(",")) == {"fwd", "bwd", "fwdbwd", "eval"}
    assert set(options["--peers"].split(",")) == {"native", "compile"}
    # memory warm: a process of its own, glibc told to keep what is freed, results beside the cold ones
    warm = suite["options"]("warm", "full-cpu", 1)
    assert options["--json"].endswith("full-cpu.json") and warm[warm.index("--json") + 1].endswith("full-cpu-warm.json")
    assert set(suite["WARM_MEMORY"]) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    # later runs beside the first, which keeps its name
    second = suite["options"]("warm", "full-cpu", 2)
    assert second[second.index("--json") + 1].endswith("full-cpu-warm-run2.json")


def test_reductions_times_the_sums_natives_backward_computes():
    """benchmarks/reductions.py: native's gradient sums, timed beside safebn's, are the same two sums
    (grad_weight and grad_bias with invstd 1); native takes float32 statistics only with float32 input."""
    bench = runpy.run_path(str(REPOSITORY / "benchmarks" / "reductions.py"))
    ops = bench["case_ops"]("4x3x5x6:channels_last:float32")
    assert set(ops) == {"stats", "grad_sums", "native_grad_sums"}
    _, grad_weight, grad_bias = ops["grad_sums"]()
    _, native_weight, native_bias = ops["native_grad_sums"]()
    torch.testing.assert_close(grad_weight, native_weight)
    torch.testing.assert_close(grad_bias, native_bias)
    assert set(bench["case_ops"]("5x7:contiguous:bfloat16")) == {"stats", "grad_sums"}


def test_cpu_suite_summary_takes_each_workloads_median_over_the_runs(tmp_path):
    suite = runpy.run_path(str(REPOSITORY / "benchmarks" / "cpu_suite.py"))

    def result(path, speedups):  # speedups: safebn's over the best peer, per workload
        rows = [{"pass": "fwd", "shape": [8, c], "layout": "contiguous", "dtype": "float32", "param_dtype": "float32",
                 "impl": impl, "speedup_vs_best_peer": speedup if impl == "safebn" else None}
                for c, speedup in speedups.items() for impl in ("safebn", "native")]
        path.write_text(json.dumps({"rows": rows}))
        return str(path)

    paths = [result(tmp_path / "a.json", {4: 2.0, 8: 0.5}), result(tmp_path / "b.json", {4: 1.0, 8: 0.8}),
             result(tmp_path / "c.json", {4: 0.8, 8: 2.0})]
    summary = suite["summarize"]("warm", paths)
    by_channels = {w["shape"][1]: w for w in summary["workloads"]}
    assert by_channels[4]["over_best_peer"] == [0.5, 1.0, 1.25] and by_channels[4]["median"] == 1.0
    assert by_channels[8]["over_best_peer"] == [2.0, 1.25, 0.5] and by_channels[8]["median"] == 1.25
    assert [run["fastest"] for run in summary["runs"]] == [1, 1, 1]
    assert summary["medians"]["fastest"] == 1 and summary["medians"]["workloads"] == 2
    assert summary["medians"]["geomean_over_best_peer"] == pytest.approx(1.25 ** 0.5)
    assert summary["memory"]["state"] == "warm"
    # a workload missing from a run: its median over the runs that timed it
    paths.append(result(tmp_path / "d.json", {4: 0.1}))
    summary = suite["summarize"]("warm", paths)
    by_channels = {w["shape"][1]: w for w in summary["workloads"]}
    assert by_channels[4]["over_best_peer"] == [0.5, 1.0, 1.25, 10.0] and by_channels[4]["median"] == 1.125
    assert by_channels[8]["over_best_peer"] == [2.0, 1.25, 0.5, None] and by_channels[8]["median"] == 1.25
