"""The console tables of a benchmark result, one line per workload: format_table
gives the median time of every implementation side by side, then safebn's
bandwidth and speed-up; format_compact_table gives safebn against its best peer only."""
from __future__ import annotations

from collections.abc import Collection

from .layer_bench import ACTIVATION_PASSES, dtype_label, workload_groups

__all__ = ["format_compact_table", "format_table"]


def format_time(microseconds: float) -> str:
    if microseconds >= 1e6:
        return f"{microseconds / 1e6:.3g} s"
    if microseconds >= 1e3:
        return f"{microseconds / 1e3:.3g} ms"
    return f"{microseconds:.3g} us"


def _microseconds(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _safebn_columns(by_impl: dict[str, dict]) -> list[str]:
    safebn, unchecked = by_impl.get("safebn"), by_impl.get("safebn-nochecks")
    if safebn is None:
        return ["-"] * 4
    speedup = safebn["speedup_vs_best_peer"]
    checks_cost = f"{100 * (safebn['median_us'] / unchecked['median_us'] - 1):+.0f}%" if unchecked else "-"
    return [
        f"{safebn['gb_per_s']:.3g}",
        f"{safebn['pct_copy_bandwidth']:.0f}%",
        f"{speedup:.2f}x" if speedup is not None else "-",
        checks_cost,
    ]


def _render(lines: list[list[str]], text_columns: Collection[int]) -> list[str]:
    """Columns padded to their widest cell, a rule under the header; the text
    columns left-aligned, the numbers right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rendered = [
        "  ".join(cell.ljust(w) if i in text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return rendered


def _title(machine: dict) -> str:
    return (
        f"{machine['device']} ({machine['device_type']}, {machine['cpu_capability']}), {machine['threads']} threads, "
        f"torch {machine['torch_version']}, copy bandwidth {machine['copy_gb_per_s']:.3g} GB/s at the start "
        "(% of copy: against a copy timed in turns with each workload)"
    )


def _passes_note() -> str:
    return "GB/s counts passes over the activation (" + ", ".join(
        f"{name} {count}" for name, count in ACTIVATION_PASSES.items()) + ")."


def format_table(result: dict) -> str:
    machine = result["machine"]
    groups = workload_groups(result["rows"])
    impls = list(dict.fromkeys(row["impl"] for row in result["rows"]))
    header = ["pass", "shape", "layout", "dtype", *impls, "safebn GB/s", "% of copy", "vs best peer", "checks cost"]
    lines = [header]
    for by_impl in groups.values():
        first = next(iter(by_impl.values()))
        times = [format_time(by_impl[impl]["median_us"]) if impl in by_impl else "-" for impl in impls]
        shape = "x".join(map(str, first["shape"]))
        lines.append([first["pass"], shape, first["layout"], dtype_label(first["dtype"], first["param_dtype"]), *times, *_safebn_columns(by_impl)])
    notes = (
        f"Median times. {_passes_note()} "
        "vs best peer: the fastest of the peers' times over safebn's (> 1: safebn is faster). "
        "checks cost: safebn over safebn-nochecks."
    )
    return "\n".join([_title(machine), "", *_render(lines, text_columns=range(4)), "", notes])


def format_compact_table(result: dict) -> str:
    """One line per workload: safebn's median, the fastest peer and its median,
    the speed-up, safebn's GB/s and % of copy bandwidth, and the cost of its checks."""
    header = ["case", "pass", "safebn us", "best peer", "peer us", "speed-up", "safebn GB/s", "% of copy", "checks cost"]
    lines = [header]
    for by_impl in workload_groups(result["rows"]).values():
        first = next(iter(by_impl.values()))
        case = f"{'x'.join(map(str, first['shape']))} {first['layout']} {dtype_label(first['dtype'], first['param_dtype'])}"
        safebn = by_impl.get("safebn")
        peers = [row for row in by_impl.values() if row["impl"] not in ("safebn", "safebn-nochecks")]
        best = min(peers, key=lambda row: row["median_us"], default=None)
        gb_per_s, pct_copy, speedup, checks_cost = _safebn_columns(by_impl)
        lines.append([
            case, first["pass"], _microseconds(safebn["median_us"]) if safebn else "-",
            best["impl"] if best else "-", _microseconds(best["median_us"]) if best else "-",
            speedup, gb_per_s, pct_copy, checks_cost,
        ])
    notes = (
        f"Median times. {_passes_note()} speed-up: the best peer's time over safebn's (> 1: safebn is faster). "
        "checks cost: safebn over safebn-nochecks."
    )
    return "\n".join([_title(result["machine"]), "", *_render(lines, text_columns=(0, 1, 3)), "", notes])
