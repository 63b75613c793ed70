"""The console tables of a layer or host benchmark result: format_table gives,
per case, the median time of every implementation on each pass, then safebn's
bandwidth and speed-up, within text.WIDTH columns; format_compact_table (for
logs, wider) gives safebn against its best peer only, one line per workload."""
from __future__ import annotations

from .layer_bench import ACTIVATION_PASSES, dtype_label, workload_groups
from .text import format_time, render_table, wrap

__all__ = ["format_compact_table", "format_table"]

# Short column headings for the implementations whose names are long (the notes spell them out).
IMPL_LABELS = {"safebn-nochecks": "no checks", "native-nocudnn": "no cuDNN", "native-module": "nn.BatchNorm"}


def _microseconds(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _gb_per_s(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _safebn_columns(by_impl: dict[str, dict], with_bandwidth: bool) -> list[str]:
    """[GB/s, % of copy (with_bandwidth only),] speed-up over the best peer, checks cost."""
    safebn, unchecked = by_impl.get("safebn"), by_impl.get("safebn-nochecks")
    if safebn is None:
        return ["-"] * (4 if with_bandwidth else 2)
    speedup = safebn["speedup_vs_best_peer"]
    columns = [f"{_gb_per_s(safebn['gb_per_s'])}", f"{safebn['pct_copy_bandwidth']:.0f}%"] if with_bandwidth else []
    return columns + [
        f"{speedup:.2f}x" if speedup is not None else "-",
        f"{100 * (safebn['median_us'] / unchecked['median_us'] - 1):+.0f}%" if unchecked else "-",
    ]


def _title(machine: dict) -> str:
    where = f"{machine['device']} ({machine['device_type']}, {machine['cpu_capability']})"
    if machine["device_type"] != "cpu" and "cpu" in machine:  # results before the field existed lack it
        where += f", host {machine['cpu']}"
    threads = machine["threads"]
    title = f"{where}, {threads} thread{'s' if threads != 1 else ''}, torch {machine['torch_version']}"
    if "copy_gb_per_s" in machine:
        title += f", copy bandwidth {machine['copy_gb_per_s']:.3g} GB/s at the start"
    return title


def _passes_note() -> str:
    return "passes over the activation (" + ", ".join(
        f"{name} {count}" for name, count in ACTIVATION_PASSES.items()) + ")"


def format_table(result: dict, title: str = "Layer benchmark") -> str:
    """A heading per case (shape, layout, dtypes), and under it a line per pass.
    title names the result at the start of the first line ("Host time per call")."""
    rows = result["rows"]
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    with_bandwidth = bool(rows) and "gb_per_s" in rows[0]  # host results time no bandwidth
    header = ["pass", *(IMPL_LABELS.get(impl, impl) for impl in impls),
              *(["GB/s", "% copy"] if with_bandwidth else []), "vs peer", "checks"]
    cases: dict[tuple, list[list[str]]] = {}
    for (pass_name, *case), by_impl in workload_groups(rows).items():
        times = [format_time(by_impl[impl]["median_us"]) if impl in by_impl else "-" for impl in impls]
        cases.setdefault(tuple(case), []).append(["  " + pass_name, *times, *_safebn_columns(by_impl, with_bandwidth)])
    lines = []
    for (shape, layout, dtype, param_dtype), passes in cases.items():
        lines += [f"{'x'.join(map(str, shape))} {layout} {dtype_label(dtype, param_dtype)}", *passes]
    labels = "; ".join(f"{label}: {impl}" for impl, label in IMPL_LABELS.items() if impl in impls)
    notes = [
        "Median time of one call.",
        *([f"GB/s: safebn's, counting {_passes_note()}; % copy: that against a copy timed in turns "
           "with each workload."] if with_bandwidth else []),
        "vs peer: the fastest peer's time over safebn's (> 1: safebn is faster).",
        "checks: safebn's time over safebn-nochecks', minus 1.",
        *([f"{labels}."] if labels else []),
    ]
    return "\n".join([wrap(f"{title}: {_title(result['machine'])}"), "", *render_table(header, lines), "",
                      wrap(" ".join(notes))])


def format_compact_table(result: dict) -> str:
    """One line per workload: safebn's median, the fastest peer and its median,
    the speed-up, safebn's GB/s and % of copy bandwidth, and the cost of its checks."""
    header = ["case", "pass", "safebn us", "best peer", "peer us", "speed-up", "safebn GB/s", "% of copy", "checks cost"]
    lines = []
    for by_impl in workload_groups(result["rows"]).values():
        first = next(iter(by_impl.values()))
        case = f"{'x'.join(map(str, first['shape']))} {first['layout']} {dtype_label(first['dtype'], first['param_dtype'])}"
        safebn = by_impl.get("safebn")
        peers = [row for row in by_impl.values() if row["impl"] not in ("safebn", "safebn-nochecks")]
        best = min(peers, key=lambda row: row["median_us"], default=None)
        gb_per_s, pct_copy, speedup, checks_cost = _safebn_columns(by_impl, with_bandwidth=True)
        lines.append([
            case, first["pass"], _microseconds(safebn["median_us"]) if safebn else "-",
            best["impl"] if best else "-", _microseconds(best["median_us"]) if best else "-",
            speedup, gb_per_s, pct_copy, checks_cost,
        ])
    notes = (
        f"Median times. GB/s counts {_passes_note()}. speed-up: the best peer's time over safebn's "
        "(> 1: safebn is faster). checks cost: safebn over safebn-nochecks."
    )
    return "\n".join([wrap(_title(result["machine"])), "", *render_table(header, lines, text_columns=(0, 1, 3)), "",
                      wrap(notes)])
