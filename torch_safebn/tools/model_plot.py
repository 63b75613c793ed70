"""The PNG of a model benchmark result: per config (variant, layout, dtypes) a
bar per implementation (native, converted, and compiled, converted-kernels),
in images per second of training, the converted bars labelled with their
speed-up over native."""
from __future__ import annotations

from .layer_bench import dtype_label
from .model_table import batch_norm_summary

__all__ = ["plot_model"]

COLOURS = {"native": "#8c8c8c", "converted": "#1f5fb4", "converted-kernels": "#7fa6d9"}  # the layer plot's safebn blue


def plot_model(result: dict, path: str) -> None:
    """Writes the PNG to path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = result["rows"]
    configs = list(dict.fromkeys(_config(row) for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    bar_height = 0.8 / len(impls)
    figure, ax = plt.subplots(figsize=(9, 1.9 + 0.55 * len(configs) * len(impls)), layout="constrained")
    for i, impl in enumerate(impls):
        mine = [row for row in rows if row["impl"] == impl]
        offsets = [configs.index(_config(row)) + (i - (len(impls) - 1) / 2) * bar_height for row in mine]
        bars = ax.barh(offsets, [row["images_per_s"] for row in mine], bar_height, label=impl,
                       color=COLOURS.get(impl), zorder=2)
        labels = [f"{row['images_per_s']:.3g}/s" + (f"  {row['speedup_vs_native']:.2f}x" if impl != "native" else "")
                  for row in mine]
        ax.bar_label(bars, labels=labels, fontsize=8, padding=3)
    ax.set_yticks(range(len(configs)), [" ".join(config) for config in configs], fontsize=9)
    ax.set_ylim(len(configs) - 0.5, -0.5)  # the first config on top
    ax.set_xlim(0, max(row["images_per_s"] for row in rows) * 1.3)  # room for the labels
    ax.set_xlabel("training images per second (right is faster); converted bars: speed-up over native", fontsize=9)
    ax.grid(axis="x", color="#dddddd", zorder=0)
    model, machine, settings = result["model"], result["machine"], result["settings"]
    size = settings["image_size"]
    ax.set_title(
        f"{model['name']}: training step at batch {settings['batch_size']}, 3x{size}x{size}\n"
        f"{machine['device']} ({machine['device_type']}, {machine['threads']} threads), torch {machine['torch_version']}\n"
        f"converted: {batch_norm_summary(model['batch_norms'])}",
        fontsize=10,
    )
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=len(impls), fontsize=9,
                  frameon=False)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _config(row: dict) -> tuple[str, str, str]:
    return row["variant"], row["layout"], dtype_label(row["dtype"], row["param_dtype"])
