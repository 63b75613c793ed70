"""torch-safebn bench --preset host: the per-call host time of safebn,
safebn-nochecks and nn.BatchNorm on tiny tensors. Performance is measured,
never asserted: these runs time each implementation for about a millisecond
and check what comes out."""
import contextlib
import io
import json
import os
import re

import pytest
import torch

import torch_safebn
from torch_safebn import _extension
from torch_safebn.tools import host_bench, layer_bench
from torch_safebn.tools.cli import main
from torch_safebn.tools.text import WIDTH


def _host_run(folder, *options: str) -> tuple[dict, str]:
    """(the JSON, what was printed) of a host run with the preset's defaults but the run time."""
    json_path = folder / "host.json"
    argv = ["bench", "--preset", "host", "--min-run-time", "0.001", "--json", str(json_path), *options]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    return json.loads(json_path.read_text()), out.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return _host_run(tmp_path_factory.mktemp("host"), "--device", "cpu")


def test_host_preset_times_its_shapes_and_passes_against_nn_batchnorm(cpu_run):
    result, _ = cpu_run
    assert result["format"] == host_bench.FORMAT
    assert (4, 8, 2, 2) in host_bench.SHAPES  # issue 13's measurement
    assert {len(shape) for shape in host_bench.SHAPES} == {2, 4, 5}
    measured = [(tuple(r["shape"]), r["pass"], r["impl"]) for r in result["rows"]]
    assert measured == [(shape, pass_name, impl) for shape in host_bench.SHAPES for pass_name in ("fwd", "fwdbwd", "eval")
                        for impl in ("safebn", "safebn-nochecks", "native-module")]
    assert {(r["layout"], r["dtype"], r["param_dtype"]) for r in result["rows"]} == {("contiguous", "float32", "float32")}


def test_host_rows_follow_their_documented_fields(cpu_run):
    result, _ = cpu_run
    machine = result["machine"]
    assert machine["threads"] == 1 and machine["device_type"] == "cpu"
    assert machine["cpus"] >= 1 and machine["cpu"] and "copy_gb_per_s" not in machine
    # which build ran: the package's directory and the commit setup.py built _C from
    assert machine["torch_safebn_path"] == os.path.dirname(os.path.abspath(torch_safebn.__file__))
    build = machine["torch_safebn_build"]
    assert build == _extension.built_from()
    assert build is None or re.fullmatch(r"[0-9a-f]{7,40}(\+changes)?", build), build
    for row in result["rows"]:
        assert list(row) == list(host_bench.ROW_FIELDS)  # in order
        for field, (kind, _) in host_bench.ROW_FIELDS.items():
            assert isinstance(row[field], kind), (field, row[field])
        assert row["threads"] == 1
    for by_impl in layer_bench.workload_groups(result["rows"]).values():
        peer = by_impl["native-module"]["median_us"]
        assert by_impl["native-module"]["speedup_vs_best_peer"] == 1.0
        for row in by_impl.values():
            assert row["speedup_vs_best_peer"] == pytest.approx(peer / row["median_us"])
            assert row["speedup_vs_native"] is None  # F.batch_norm alone was not a peer


def test_host_table_fits_100_columns_and_names_the_peer(cpu_run):
    _, out = cpu_run
    lines = out.splitlines()
    assert lines[0].startswith("Host time per call: ") and "1 thread," in lines[0]
    assert max(map(len, lines)) <= WIDTH
    header = next(line.split() for line in lines if line.startswith("pass "))
    assert header == ["pass", "safebn", "no", "checks", "nn.BatchNorm", "vs", "peer", "checks"]
    assert "4x8x2x2 contiguous float32" in lines


def test_host_options_override_the_presets_defaults(tmp_path):
    result, _ = _host_run(tmp_path, "--device", "cpu", "--passes", "bwd", "--threads", "2", "--dtypes", "bfloat16",
                          "--layouts", "channels_last", "--peers", "native,native-module")
    assert {row["pass"] for row in result["rows"]} == {"bwd"}
    assert result["machine"]["threads"] == 2
    # channels_last exists for the 4-D and 5-D shapes only
    assert {(len(r["shape"]), r["layout"], r["dtype"]) for r in result["rows"]} == {
        (4, "channels_last", "bfloat16"), (5, "channels_last", "bfloat16")}
    assert {row["impl"] for row in result["rows"]} == {"safebn", "safebn-nochecks", "native", "native-module"}


def test_host_preset_draws_no_plot(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--preset", "host", "--plot", "host.png"])
    assert "the host benchmark draws no plot" in str(exit_info.value.code)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_preset_runs_on_cuda(tmp_path):
    result, _ = _host_run(tmp_path, "--device", "cuda", "--passes", "fwdbwd")
    assert result["machine"]["device_type"] == "cuda" and result["machine"]["cpu"]
    assert len(result["rows"]) == len(host_bench.SHAPES) * 3
