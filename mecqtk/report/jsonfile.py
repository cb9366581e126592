"""report.json: the report as stable, versioned JSON (layout documented in docs/report.md).

Readers should check ``format`` and ``version``; within one version keys are only ever added.
Infinite or undefined numbers (an exact quantizer's SQNR, a cosine of zero vectors) are null.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mecqtk.errors import MecqtkError
from mecqtk.report.result import (
    Comparison,
    LayerStats,
    Report,
    Score,
    Sensitivity,
    TensorStats,
    finite_or_none,
)

FORMAT = "mecqtk-report"
VERSION = 1
SUGGESTED_RECIPE_FILE = "suggested_recipe.yaml"


def _score(score: Score) -> dict[str, Any]:
    return {"top1": score.top1, "loss": finite_or_none(score.loss)}


def _tensor(stats: TensorStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        "quantizer": stats.quantizer,
        "bits": stats.bits,
        "signed": stats.signed,
        "granularity": stats.granularity,
        "step": {"count": stats.step.count, "min": stats.step.min, "mean": stats.step.mean,
                 "max": stats.step.max},
        "sqnr_db": finite_or_none(stats.sqnr_db),
        "mse": finite_or_none(stats.mse),
        "cosine": finite_or_none(stats.cosine),
        "clip_ratio": finite_or_none(stats.clip_ratio),
        "levels": {
            "used": stats.levels_used,
            "total": stats.levels_total,
            "entropy_bits": finite_or_none(stats.entropy_bits),
            "qmin": stats.qmin,
            "histogram": list(stats.histogram),
        },
    }


def _layer(stats: LayerStats) -> dict[str, Any]:
    return {
        "index": stats.index,
        "name": stats.name,
        "kind": stats.kind,
        "params": stats.params,
        "weight": _tensor(stats.weight),
        "input": _tensor(stats.input),
        "local_sqnr_db": finite_or_none(stats.local_sqnr_db),
        "output_sqnr_db": finite_or_none(stats.output_sqnr_db),
        "output_sqnr_bypass_db": finite_or_none(stats.output_sqnr_bypass_db),
        "output_cosine": finite_or_none(stats.output_cosine),
    }


def _sensitivity(sensitivity: Sensitivity | None) -> dict[str, Any] | None:
    if sensitivity is None:
        return None
    return {
        "subject": {"kind": sensitivity.subject.kind, "detail": sensitivity.subject.detail},
        "quantized": _score(sensitivity.quantized_score),
        "float": _score(sensitivity.float_score),
        "layers": [
            {"name": e.name, "alone": _score(e.alone), "all_but": _score(e.all_but),
             "loss_added": finite_or_none(sensitivity.loss_added(e.name)),
             "loss_recovered": finite_or_none(sensitivity.loss_recovered(e.name))}
            for e in sensitivity.layers
        ],
        "suggested_recipe": {"file": SUGGESTED_RECIPE_FILE,
                             "name": sensitivity.suggested_recipe.name,
                             "raised": [{"name": name, "bits": bits}
                                        for name, bits in sensitivity.raised.items()]},
    }


def _comparison(comparison: Comparison | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    return {
        "other_run": comparison.other_run,
        "other_recipe": comparison.other_recipe,
        "other_reference": {"kind": comparison.other_reference.kind,
                            "detail": comparison.other_reference.detail},
        "this": _score(comparison.this_score),
        "other": _score(comparison.other_score),
        "layers": [
            {"name": d.name, "in_this": d.in_this, "in_other": d.in_other,
             "deltas": {k: finite_or_none(v) for k, v in d.deltas.items()}}
            for d in comparison.layers
        ],
    }


def report_to_json(report: Report) -> dict[str, Any]:
    """The JSON document of ``report`` (a dict of plain values, ready for ``json.dumps``)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "run": {"path": report.run, "model": report.model, "recipe": report.recipe,
                "data": report.data, "images": report.images},
        "reference": {"kind": report.reference.kind, "detail": report.reference.detail},
        "accuracy": {"quantized": _score(report.quantized_score),
                     "float": _score(report.float_score),
                     "bypass": _score(report.bypass_score)},
        "ranking": {"by": report.ranking_by, "layers": list(report.ranking)},
        "layers": [_layer(entry) for entry in report.layers],
        "sensitivity": _sensitivity(report.sensitivity),
        "comparison": _comparison(report.comparison),
    }


def dumps(report: Report) -> str:
    return json.dumps(report_to_json(report), indent=2, allow_nan=False) + "\n"


def read_report_json(path: str | Path) -> dict[str, Any]:
    """Read a report.json, checking that it is one and that this mecqtk reads its version.

    Example:
        >>> doc = read_report_json("runs/r20_w2a2/report.json")  # doctest: +SKIP
        >>> doc["ranking"]["layers"][0]  # doctest: +SKIP
        'layer3.0.conv1'
    """
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MecqtkError(f"{path}: cannot read report JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise MecqtkError(f"{path}: not a mecqtk report (format is not {FORMAT!r})")
    if document.get("version") != VERSION:
        raise MecqtkError(f"{path}: report version {document.get('version')!r} is not "
                          f"{VERSION}; re-run `mecqtk report` with this mecqtk")
    return document
