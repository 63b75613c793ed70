"""The console table of a model benchmark result: per config (variant, layout,
dtypes) the native and the converted model's time per training step, images
per second and speed-ups, under a title that says how many of the model's batch
norms torch_safebn guards."""
from __future__ import annotations

from .layer_bench import dtype_label
from .text import format_time, render_table, wrap

__all__ = ["batch_norm_summary", "format_table"]


def batch_norm_summary(batch_norms: dict) -> str:
    """"20 batch norms, all guarded by torch_safebn", or how many were left native, by class."""
    total, guarded, left = batch_norms["total"], batch_norms["guarded"], batch_norms["left_native"]
    if not left:
        return f"{total} batch norms, all guarded by torch_safebn"
    classes = ", ".join(f"{count} {name}" for name, count in sorted(left.items()))
    return f"{total} batch norms: {guarded} guarded by torch_safebn, {total - guarded} left native ({classes})"


def _ms(milliseconds: float | None) -> str:
    if milliseconds is None:
        return "-"
    return f"{milliseconds:.3g}" if milliseconds < 100 else f"{milliseconds:.0f}"


def _title(result: dict) -> str:
    model, machine, settings = result["model"], result["machine"], result["settings"]
    size = settings["image_size"]
    return "\n".join([
        wrap(f"Model benchmark: {model['name']} ({model['class']}, {model['parameters'] / 1e6:.1f} M parameters), "
             "training steps "
             f"of {settings['batch_size']} images of 3x{size}x{size}. Converted model: "
             f"{batch_norm_summary(model['batch_norms'])}."),
        wrap(f"{machine['device']} ({machine['device_type']}, {machine['cpu_capability']}), "
             f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}, torch {machine['torch_version']}"),
    ])


def format_table(result: dict) -> str:
    """A heading per config, and under it a line per implementation."""
    header = ["impl", "ms/step", "IQR ms", "images/s", "vs native", "vs best", "steps", "first step"]
    lines, config = [], None
    for row in result["rows"]:
        row_config = (row["variant"], row["layout"], dtype_label(row["dtype"], row["param_dtype"]))
        if row_config != config:
            config = row_config
            lines.append(" ".join(config))
        lines.append([
            "  " + row["impl"], _ms(row["median_ms"]), _ms(row["iqr_ms"]), f"{row['images_per_s']:.3g}",
            f"{row['speedup_vs_native']:.2f}x", f"{row['speedup_vs_best_peer']:.2f}x", str(row["steps"]),
            format_time(row["first_step_s"] * 1e6),
        ])
    notes = (
        "Median time of one training step (forward, cross-entropy, backward, SGD step with momentum). "
        "vs native: native's time in the same config over this one (> 1: faster than native); vs best: the "
        "fastest native of the same layout and dtypes, eager or compiled, over this one. first step: not in the "
        "median; torch.compile's compilation included. bfloat16/float32: forward and loss under torch.autocast."
    )
    return "\n".join([_title(result), "", *render_table(header, lines), "", wrap(notes)])
