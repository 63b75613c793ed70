"""The PNG of a benchmark result: one panel per pass, side by side, one line per
workload across them; on each line a bar per implementation giving its speed-up
over native eager batch norm (log scale), the 1.0 line (native) and the
copy-bandwidth ceiling: the speed-up at which the pass would move its bytes as
fast as a plain tensor copy. Horizontal bars keep a long list of workloads
readable, and a workload reads across the passes on one line."""
from __future__ import annotations

from .layer_bench import ACTIVATION_PASSES, dtype_label, workload_groups

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
CEILING_LABEL = "ceiling: the pass at the copy bandwidth timed with it"


def _times(speedup: float) -> str:
    return f"{speedup:.2g}x" if speedup < 10 else f"{speedup:.0f}x"


_CASE_FIELDS = ("shape", "layout", "dtype", "param_dtype")  # a workload's key, less the pass
_LAYOUT_NAMES = {("contiguous", 4): "NCHW", ("contiguous", 5): "NCDHW", ("channels_last", 4): "NHWC",
                 ("channels_last", 5): "NDHWC"}


def _case_label(row: dict) -> str:
    shape = "x".join(map(str, row["shape"]))
    layout = _LAYOUT_NAMES.get((row["layout"], len(row["shape"])), row["layout"])
    return f"{shape} {layout} {dtype_label(row['dtype'], row['param_dtype'])}"


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
    cases = list(dict.fromkeys(key[1:] for key in groups))  # _CASE_FIELDS, in the order measured
    machine = result["machine"]

    figure, axes = plt.subplots(
        1, len(passes), sharey=True, squeeze=False, layout="constrained",
        figsize=(3.0 + 3.4 * len(passes), 1.8 + _cases_height(len(cases), len(impls))),
    )
    for ax, pass_name in zip(axes[0], passes):
        _draw_pass(ax, pass_name, [groups.get((pass_name, *case), {}) for case in cases], impls)
    axes[0, 0].set_yticks(range(len(cases)), [_case_label(dict(zip(_CASE_FIELDS, case))) for case in cases],
                          fontsize=9)
    handle_of = {}
    for ax in axes[0]:
        handle_of.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels = [label for label in (*impls, NATIVE_LABEL, CEILING_LABEL) if label in handle_of]
    figure.suptitle(
        "torch_safebn vs native batch norm: speed-up over native eager, per pass\n"
        f"{machine['device']} ({machine['device_type']}, {machine['threads']} threads), "
        f"torch {machine['torch_version']}, copy bandwidth {machine['copy_gb_per_s']:.3g} GB/s",
        fontsize=11,
    )
    figure.legend([handle_of[label] for label in labels], labels, loc="outside lower center",
                  ncol=len(labels), fontsize=9, frameon=False)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cases_height(cases: int, impls: int) -> float:
    """Inches for the bars: 0.17 a bar, and a gap between workloads."""
    return cases * (0.17 * max(impls, 1) + 0.12)


def _draw_pass(ax, pass_name: str, cases: list[dict], impls: list[str]) -> None:
    """One panel: per workload (case), a bar per implementation, and its ceiling.
    A workload this pass did not measure, or measured without native, stays empty."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    widths = [1.0]
    bar_height = 0.8 / max(len(impls), 1)
    measured = [c for c, case in enumerate(cases) if "native" in case]
    for i, impl in enumerate(impls):
        rows = [(c, cases[c][impl]["speedup_vs_native"]) for c in measured if impl in cases[c]]
        offsets = [c + (i - (len(impls) - 1) / 2) * bar_height for c, _ in rows]
        speedups = [speedup for _, speedup in rows]
        widths += speedups
        bars = ax.barh(offsets, speedups, bar_height, label=impl, color=COLOURS.get(impl), zorder=2)
        if impl == "safebn":
            ax.bar_label(bars, labels=[_times(s) for s in speedups], fontsize=8, padding=2, zorder=4,
                         bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none"))
    for n, c in enumerate(measured):
        native = cases[c]["native"]
        # The copy timed in turns with this workload sets its ceiling.
        ceiling = native["median_us"] / (native["bytes"] / (native["copy_gb_per_s"] * 1e3))
        widths.append(ceiling)
        ax.vlines(ceiling, c - 0.45, c + 0.45, colors=CEILING_COLOUR, linewidth=2, zorder=3,
                  label=CEILING_LABEL if n == 0 else None)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, zorder=3, label=NATIVE_LABEL)
    ax.set_xscale("log")
    ax.set_xlim(min(widths) / 1.5, max(widths) * 3.0)  # room for the labels past the bars
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", which="major", color="#dddddd", zorder=0)
    ax.set_ylim(len(cases) - 0.5, -0.5)  # the first workload on top
    ax.set_title(f"{pass_name}: {PASS_TITLES[pass_name]}\n({ACTIVATION_PASSES[pass_name]} passes over the activation)",
                 fontsize=10)
    ax.set_xlabel("speed-up over native (log scale, right is faster)", fontsize=9)
