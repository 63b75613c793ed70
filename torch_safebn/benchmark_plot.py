"""The PNG of a benchmark result: per pass, grouped bars of each implementation's
speed-up over native eager batch norm, with the 1.0 line (native) and, per
workload, the copy-bandwidth ceiling: the speed-up at which the pass would move
its bytes as fast as a plain tensor copy."""
from __future__ import annotations

from .benchmark import ACTIVATION_PASSES, dtype_label, workload_groups

__all__ = ["plot_speedups"]

PASS_TITLES = {
    "fwd": "training forward",
    "bwd": "backward",
    "fwdbwd": "training forward + backward",
    "eval": "eval forward",
}
# Bar colours: safebn stands out, its unchecked twin is its lighter shade, peers are muted.
COLOURS = {"safebn": "#1f5fb4", "safebn-nochecks": "#8fb5e6", "compile": "#e08a2c", "native-nocudnn": "#8c8c8c"}
CEILING_COLOUR = "#c0392b"
NATIVE_LABEL = "native eager = 1"
CEILING_LABEL = "ceiling: the pass at copy bandwidth"


def _times(speedup: float) -> str:
    return f"{speedup:.2g}x" if speedup < 10 else f"{speedup:.0f}x"


_LAYOUT_NAMES = {("contiguous", 4): "NCHW", ("contiguous", 5): "NCDHW", ("channels_last", 4): "NHWC",
                 ("channels_last", 5): "NDHWC"}


def _case_label(row: dict) -> str:
    shape = "x".join(map(str, row["shape"]))
    layout = _LAYOUT_NAMES.get((row["layout"], len(row["shape"])), row["layout"])
    return f"{shape}\n{layout}\n{dtype_label(row['dtype'], row['param_dtype'])}"


def plot_speedups(result: dict, path: str) -> None:
    """Writes the PNG to path. Needs the native peer among the result's rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    groups = workload_groups(result["rows"])
    if not any("native" in by_impl for by_impl in groups.values()):
        raise ValueError("the plot shows speed-ups over native batch norm: run the benchmark with the native peer")
    impls = [impl for impl in dict.fromkeys(row["impl"] for row in result["rows"]) if impl != "native"]
    passes = [p for p in ACTIVATION_PASSES if any(key[0] == p for key in groups)]
    cases_per_pass = max(sum(key[0] == p for key in groups) for p in passes)
    machine = result["machine"]

    figure, axes = plt.subplots(
        len(passes), 1, figsize=(max(9.0, 1.3 * cases_per_pass + 2.5), 3.6 * len(passes) + 1.0), squeeze=False,
        layout="constrained",
    )
    for ax, pass_name in zip(axes[:, 0], passes):
        cases = [by_impl for key, by_impl in groups.items() if key[0] == pass_name and "native" in by_impl]
        _draw_pass(ax, pass_name, cases, impls, copy_bytes_per_us=machine["copy_gb_per_s"] * 1e3)
    handle_of = dict(zip(*reversed(axes[0, 0].get_legend_handles_labels())))
    labels = [*impls, NATIVE_LABEL, CEILING_LABEL]  # the bars first, then the lines
    figure.suptitle(
        "torch_safebn vs native batch norm: speed-up over native eager, per pass\n"
        f"{machine['device']} ({machine['device_type']}, {machine['threads']} threads), "
        f"torch {machine['torch_version']}, copy bandwidth {machine['copy_gb_per_s']:.3g} GB/s",
        fontsize=11,
    )
    # At most three entries a row: the legend stays within a narrow figure.
    figure.legend([handle_of[label] for label in labels], labels, loc="outside lower center",
                  ncol=min(len(labels), 3), fontsize=9, frameon=False)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw_pass(ax, pass_name: str, cases: list[dict], impls: list[str], copy_bytes_per_us: float) -> None:
    """One panel: per workload (case), a bar per implementation, and its ceiling."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    heights = [1.0]
    bar_width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        offsets = [c + (i - (len(impls) - 1) / 2) * bar_width for c in range(len(cases))]
        speedups = [case[impl]["speedup_vs_native"] for case in cases]
        heights += speedups
        bars = ax.bar(offsets, speedups, bar_width, label=impl, color=COLOURS.get(impl), zorder=2)
        if impl == "safebn":
            ax.bar_label(bars, labels=[_times(s) for s in speedups], fontsize=8, padding=2, zorder=4,
                         bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none"))
    for c, case in enumerate(cases):
        native = case["native"]
        ceiling = native["median_us"] / (native["bytes"] / copy_bytes_per_us)
        heights.append(ceiling)
        ax.hlines(ceiling, c - 0.45, c + 0.45, colors=CEILING_COLOUR, linewidth=2, zorder=3,
                  label=CEILING_LABEL if c == 0 else None)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, zorder=3, label=NATIVE_LABEL)
    ax.set_yscale("log")
    ax.set_ylim(min(heights) / 1.5, max(heights) * 2.0)  # room for the labels above the bars
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="y", which="major", color="#dddddd", zorder=0)
    ax.set_xticks(range(len(cases)), [_case_label(case["native"]) for case in cases], fontsize=8)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_title(f"{pass_name}: {PASS_TITLES[pass_name]} ({ACTIVATION_PASSES[pass_name]} passes over the activation)",
                 loc="left", fontsize=10)
    ax.set_ylabel("speed-up over native\n(log scale, higher is faster)", fontsize=9)
