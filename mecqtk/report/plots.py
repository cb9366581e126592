"""The report's figures, drawn with matplotlib's object API (no pyplot state) as PNG bytes.

Every function takes result dataclasses and returns PNG bytes; the HTML page embeds them.
"""

from __future__ import annotations

import io
import math

import torch
from matplotlib.figure import Figure

from mecqtk.report.result import Comparison, LayerStats, Report, Sensitivity

# Grids with more levels than this are drawn as their clipping bounds only: 256 lines are noise.
MAX_GRID_LINES = 32
COLORS = {"weight": "#1f77b4", "input": "#ff7f0e", "local": "#2ca02c", "output": "#d62728",
          "other": "#9467bd"}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _value(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else math.nan


def _legend_outside(axes) -> None:
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _layer_axis(axes, layers: list[LayerStats]) -> None:
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels([entry.name for entry in layers], rotation=70, ha="right", fontsize=7)
    axes.set_xlim(-0.6, len(layers) - 0.4)
    axes.grid(axis="y", alpha=0.3)


def sqnr_chart(report: Report) -> bytes:
    """SQNR of weights, inputs, each layer's own output and the accumulated output, per layer."""
    layers = report.layers
    figure = Figure(figsize=(max(8.0, 0.32 * len(layers) + 3), 4.2))
    axes = figure.add_subplot()
    x = range(len(layers))
    series = [
        ("weight", "weight", [entry.weight.sqnr_db for entry in layers]),
        ("input", "input activation", [entry.input.sqnr_db if entry.input else None
                                       for entry in layers]),
        ("local", "layer output, own error", [entry.local_sqnr_db for entry in layers]),
        ("output", "layer output vs float model", [entry.output_sqnr_db for entry in layers]),
    ]
    for key, label, values in series:
        axes.plot(x, [_value(v) for v in values], marker="o", markersize=3.5, label=label,
                  color=COLORS[key])
    if report.comparison is not None:
        other = {entry.name: entry.output_sqnr_db for entry in report.comparison.other_layers}
        axes.plot(x, [_value(other.get(entry.name)) for entry in layers], linestyle="--",
                  marker="x", markersize=4, color=COLORS["other"],
                  label=f"output vs float, {report.comparison.other_recipe}")
    axes.set_ylabel("SQNR (dB)")
    axes.set_title("Per-layer SQNR (higher is better)")
    _layer_axis(axes, layers)
    _legend_outside(axes)
    return _png(figure)


def level_usage_chart(report: Report) -> bytes:
    """Share of the 2^b levels used, and entropy of the level histogram against b, per layer."""
    layers = report.layers
    figure = Figure(figsize=(max(8.0, 0.32 * len(layers) + 3), 6.0))
    used_axes, entropy_axes = figure.subplots(2, 1, sharex=True)
    x = torch.arange(len(layers)).float()
    width = 0.38
    for offset, key, read in ((-width / 2, "weight", lambda e: e.weight),
                              (width / 2, "input", lambda e: e.input)):
        stats = [read(entry) for entry in layers]
        used = [s.levels_used / s.levels_total if s else math.nan for s in stats]
        entropy = [_value(s.entropy_bits) if s else math.nan for s in stats]
        bits = [s.bits if s else math.nan for s in stats]
        used_axes.bar((x + offset).tolist(), used, width, color=COLORS[key], label=key)
        entropy_axes.bar((x + offset).tolist(), entropy, width, color=COLORS[key],
                         label=f"{key} entropy")
        entropy_axes.scatter((x + offset).tolist(), bits, marker="_", s=120, color="black",
                             zorder=3, label="bits available" if key == "input" else None)
    used_axes.set_ylabel("levels used / 2^b")
    used_axes.set_ylim(0, 1.05)
    used_axes.set_title("Level usage (share of the grid used, and histogram entropy)")
    _legend_outside(used_axes)
    entropy_axes.set_ylabel("entropy (bits)")
    _legend_outside(entropy_axes)
    _layer_axis(used_axes, layers)
    _layer_axis(entropy_axes, layers)
    return _png(figure)


def _grid_lines(axes, lower: int, upper: int, step: float) -> None:
    """Draw the quantization levels (when few) and the saturation bounds of a grid."""
    if upper - lower + 1 <= MAX_GRID_LINES:
        for code in range(lower, upper + 1):
            axes.axvline(code * step, color="black", linewidth=0.7, alpha=0.7, zorder=3)
    for bound in ((lower - 0.5) * step, (upper + 0.5) * step):
        axes.axvline(bound, color="red", linewidth=1.2, linestyle="--", zorder=3)


def _finite(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The finite values (matplotlib cannot bin inf or NaN) and how many were left out: a
    diverged model must still get its report, which then says so."""
    keep = torch.isfinite(values)
    return values[keep], int((~keep).sum())


def _dropped_note(count: int) -> str:
    return f"\n{count} non-finite values not drawn" if count else ""


def layer_histograms(report: Report, name: str) -> bytes:
    """Weight (in steps) and input-activation histograms of one layer, with its grid."""
    entry = report.layer(name)
    figure = Figure(figsize=(10.0, 3.2))
    weight_axes, input_axes = figure.subplots(1, 2)
    weights, weights_dropped = _finite(report.samples.weights_in_steps.get(name, torch.empty(0)))
    if weights.numel():
        weight_axes.hist(weights.numpy(), bins=120, color=COLORS["weight"], alpha=0.8)
    weight_axes.set_yscale("log")
    _grid_lines(weight_axes, entry.weight.qmin,
                entry.weight.qmin + entry.weight.levels_total - 1, 1.0)
    weight_axes.set_title(f"{name}: weight / step  ({entry.weight.bits}-bit, "
                          f"SQNR {_value(entry.weight.sqnr_db):.1f} dB)"
                          + _dropped_note(weights_dropped), fontsize=9)
    weight_axes.set_xlabel("weight in units of its channel's step")
    inputs, inputs_dropped = _finite(report.samples.inputs.get(name, torch.empty(0)))
    if entry.input is not None and inputs.numel():
        input_axes.hist(inputs.numpy(), bins=120, color=COLORS["input"], alpha=0.8)
        input_axes.set_yscale("log")
        _grid_lines(input_axes, entry.input.qmin,
                    entry.input.qmin + entry.input.levels_total - 1, entry.input.step.mean)
        input_axes.set_title(f"input ({entry.input.bits}-bit, clipped "
                             f"{100 * _value(entry.input.clip_ratio):.2f} %, "
                             f"SQNR {_value(entry.input.sqnr_db):.1f} dB)"
                             + _dropped_note(inputs_dropped), fontsize=9)
        input_axes.set_xlabel("input activation value")
    else:
        input_axes.set_title("input not quantized", fontsize=9)
    return _png(figure)


def sensitivity_chart(sensitivity: Sensitivity, order: list[str]) -> bytes:
    """Loss change per layer: recovered when only it is float, added when only it is quantized."""
    by_name = {entry.name: entry for entry in sensitivity.layers}
    names = [name for name in order if name in by_name]
    recovered = [sensitivity.loss_recovered(name) for name in names]
    alone = [sensitivity.loss_added(name) for name in names]
    figure = Figure(figsize=(max(8.0, 0.32 * len(names) + 3), 4.0))
    axes = figure.add_subplot()
    x = torch.arange(len(names)).float()
    axes.bar((x - 0.2).tolist(), recovered, 0.4, color=COLORS["local"],
             label="loss recovered keeping only this layer float")
    axes.bar((x + 0.2).tolist(), alone, 0.4, color=COLORS["output"],
             label="loss added quantizing only this layer")
    axes.set_xticks(x.tolist())
    axes.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("cross-entropy change")
    axes.set_title("Layer sensitivity (most costly first)")
    axes.grid(axis="y", alpha=0.3)
    _legend_outside(axes)
    return _png(figure)


def compare_chart(comparison: Comparison) -> bytes:
    """Per-layer SQNR differences between this run and the other one."""
    rows = [d for d in comparison.layers if d.in_this and d.in_other]
    figure = Figure(figsize=(max(8.0, 0.32 * len(rows) + 3), 4.0))
    axes = figure.add_subplot()
    x = torch.arange(len(rows)).float()
    for offset, key, color in ((-0.27, "weight_sqnr_db", COLORS["weight"]),
                               (0.0, "local_sqnr_db", COLORS["local"]),
                               (0.27, "output_sqnr_db", COLORS["output"])):
        axes.bar((x + offset).tolist(), [_value(d.deltas[key]) for d in rows], 0.27,
                 color=color, label=f"Δ {key}")
    axes.set_xticks(x.tolist())
    axes.set_xticklabels([d.name for d in rows], rotation=70, ha="right", fontsize=7)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("this run − other run (dB)")
    axes.set_title(f"Per-layer SQNR change against {comparison.other_recipe}")
    axes.grid(axis="y", alpha=0.3)
    _legend_outside(axes)
    return _png(figure)
