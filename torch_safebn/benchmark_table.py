"""The console table of a benchmark result: one line per workload, the median
time of every implementation side by side, then safebn's bandwidth and speed-up."""
from __future__ import annotations

from .benchmark import ACTIVATION_PASSES, dtype_label, workload_groups

__all__ = ["format_table"]


def format_time(microseconds: float) -> str:
    if microseconds >= 1e6:
        return f"{microseconds / 1e6:.3g} s"
    if microseconds >= 1e3:
        return f"{microseconds / 1e3:.3g} ms"
    return f"{microseconds:.3g} us"


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
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text_columns = 4  # left-aligned; the numbers are right-aligned
    rendered = [
        "  ".join(cell.ljust(w) if i < text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    passes = ", ".join(f"{name} {count}" for name, count in ACTIVATION_PASSES.items())
    title = (
        f"{machine['device']} ({machine['device_type']}, {machine['cpu_capability']}), {machine['threads']} threads, "
        f"torch {machine['torch_version']}, copy bandwidth {machine['copy_gb_per_s']:.3g} GB/s"
    )
    notes = (
        f"Median times. GB/s counts passes over the activation ({passes}). "
        "vs best peer: the fastest of the peers' times over safebn's (> 1: safebn is faster). "
        "checks cost: safebn over safebn-nochecks."
    )
    return "\n".join([title, "", *rendered, "", notes])
