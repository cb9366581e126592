"""The ranking table as text cells, shared by the terminal and the HTML renderers.

The HTML page shows every column; the terminal shows a compact subset that fits ~100 columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mecqtk.report.result import LayerStats, Report, TensorStats


@dataclass(frozen=True)
class Column:
    title: str
    help: str
    compact: bool = True  # shown in the terminal too


def db(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.1f}"


def signed_number(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}"


def _levels(stats: TensorStats | None) -> str:
    return f"{stats.levels_used}/{stats.levels_total}" if stats else "–"


def _entropy(stats: TensorStats | None) -> str:
    if stats is None or not math.isfinite(stats.entropy_bits):
        return "–"
    return f"{stats.entropy_bits:.1f}"


def _step(stats: TensorStats | None) -> str:
    if stats is None:
        return "–"
    if stats.step.count == 1:
        return f"{stats.step.mean:.3g}"
    return f"{stats.step.mean:.3g} [{stats.step.min:.2g}, {stats.step.max:.2g}]"


def _bits(entry: LayerStats) -> str:
    return f"W{entry.weight.bits}A{entry.input.bits if entry.input else '–'}"


def _clip(entry: LayerStats) -> str:
    clip = entry.input.clip_ratio if entry.input else None
    return "–" if clip is None or math.isnan(clip) else f"{100 * clip:.1f}"


def columns(report: Report, compact: bool = False) -> list[Column]:
    """The table's columns; ``compact`` keeps the terminal's subset."""
    cols = [
        Column("#", "rank, worst first"),
        Column("layer", "module name"),
        Column("bits", "weight and input-activation bit widths"),
        Column("W dB", "weight SQNR"),
        Column("A dB", "input activation SQNR against its unquantized value"),
        Column("clip %", "share of input activation values saturated by the grid"),
        Column("own dB", "SQNR of the layer output against its float op on the same "
                         "unquantized input: the error this layer adds"),
        Column("out dB", f"SQNR of the layer output against the float reference "
                         f"({report.reference.kind}): the accumulated error"),
        Column("W levels", "weight levels used / 2^b", compact=False),
        Column("A levels", "input levels used / 2^b", compact=False),
        Column("H W/A", "entropy of the weight / input level histograms, bits"),
        Column("W step", "weight step size: mean [min, max] over channels", compact=False),
        Column("A step", "input step size", compact=False),
    ]
    if report.sensitivity is not None:
        cols.append(Column("+loss alone", "loss added quantizing only this layer"))
        cols.append(Column("−loss float", "loss recovered keeping only this layer float"))
    if report.comparison is not None:
        cols.append(Column("Δ own", "own dB, this run minus the compared run"))
        cols.append(Column("Δ out", "out dB, this run minus the compared run"))
    return [c for c in cols if c.compact or not compact]


def rows(report: Report, compact: bool = False) -> list[list[str]]:
    """One row of cells per layer, in ranking order (worst first), matching :func:`columns`."""
    titles = [c.title for c in columns(report, compact)]
    sensitivity = report.sensitivity
    known = {e.name for e in sensitivity.layers} if sensitivity is not None else set()
    deltas = ({d.name: d.deltas for d in report.comparison.layers}
              if report.comparison is not None else {})
    result = []
    for rank, entry in enumerate(report.ranked_layers(), start=1):
        cells = {
            "#": str(rank), "layer": entry.name, "bits": _bits(entry),
            "W dB": db(entry.weight.sqnr_db),
            "A dB": db(entry.input.sqnr_db if entry.input else None),
            "clip %": _clip(entry), "own dB": db(entry.local_sqnr_db),
            "out dB": db(entry.output_sqnr_db), "W levels": _levels(entry.weight),
            "A levels": _levels(entry.input),
            "H W/A": f"{_entropy(entry.weight)}/{_entropy(entry.input)}",
            "W step": _step(entry.weight), "A step": _step(entry.input),
        }
        if sensitivity is not None:
            found = entry.name in known
            cells["+loss alone"] = (signed_number(sensitivity.loss_added(entry.name))
                                    if found else "–")
            cells["−loss float"] = (signed_number(sensitivity.loss_recovered(entry.name))
                                    if found else "–")
        if report.comparison is not None:
            delta = deltas.get(entry.name, {})
            cells["Δ own"] = signed_number(delta.get("local_sqnr_db"), 1)
            cells["Δ out"] = signed_number(delta.get("output_sqnr_db"), 1)
        result.append([cells[title] for title in titles])
    return result
