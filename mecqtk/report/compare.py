"""Per-layer deltas between two runs' reports (say LSQ alone against LSQ + MEC), matched by name."""

from __future__ import annotations

import math
from collections.abc import Callable

from mecqtk.report.result import Comparison, LayerDelta, LayerStats, Report

# The per-layer quantities compared, each read from a LayerStats (None where undefined).
COMPARED: dict[str, Callable[[LayerStats], float | None]] = {
    "weight_sqnr_db": lambda s: s.weight.sqnr_db,
    "input_sqnr_db": lambda s: s.input.sqnr_db if s.input else None,
    "local_sqnr_db": lambda s: s.local_sqnr_db,
    "output_sqnr_db": lambda s: s.output_sqnr_db,
    "weight_entropy_bits": lambda s: s.weight.entropy_bits,
    "input_entropy_bits": lambda s: s.input.entropy_bits if s.input else None,
    "weight_bits": lambda s: float(s.weight.bits),
    "input_bits": lambda s: float(s.input.bits) if s.input else None,
    "input_clip_ratio": lambda s: s.input.clip_ratio if s.input else None,
}


def _difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a - b


def layer_deltas(this: list[LayerStats], other: list[LayerStats]) -> list[LayerDelta]:
    """``this - other`` for every quantity in :data:`COMPARED`, in this run's layer order.

    Layers found in one run only are listed too (this run's first, then the other's), with
    every delta None.

    Example:
        >>> deltas = layer_deltas(mec_report.layers, lsq_report.layers)  # doctest: +SKIP
        >>> deltas[0].deltas["output_sqnr_db"]  # doctest: +SKIP
        1.7
    """
    others = {entry.name: entry for entry in other}
    names = [entry.name for entry in this]
    result = []
    for entry in this:
        match = others.get(entry.name)
        deltas = {key: (_difference(read(entry), read(match)) if match is not None else None)
                  for key, read in COMPARED.items()}
        result.append(LayerDelta(entry.name, in_this=True, in_other=match is not None,
                                 deltas=deltas))
    for entry in other:
        if entry.name not in names:
            result.append(LayerDelta(entry.name, in_this=False, in_other=True,
                                     deltas=dict.fromkeys(COMPARED)))
    return result


def compare_reports(this: Report, other: Report) -> Comparison:
    """The comparison of ``this`` run against ``other``, measured on the same images."""
    return Comparison(
        other_run=other.run,
        other_recipe=other.recipe,
        other_reference=other.reference,
        this_score=this.quantized_score,
        other_score=other.quantized_score,
        layers=layer_deltas(this.layers, other.layers),
        other_layers=other.layers,
    )
