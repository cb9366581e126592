"""What a report holds: plain dataclasses that the terminal, JSON and HTML renderers all read.

Field meanings are documented once, in docs/report.md (the JSON layout mirrors these classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mecqtk.recipe import Recipe


@dataclass(frozen=True)
class StepStats:
    """The step size(s) of one quantizer: one per tensor, or one per output channel."""

    count: int
    min: float
    mean: float
    max: float


@dataclass(frozen=True)
class TensorStats:
    """Quantization error and grid usage of one quantized tensor (a weight or an input)."""

    quantizer: str  # module name of the quantizer
    bits: int
    signed: bool
    granularity: str
    step: StepStats
    sqnr_db: float
    mse: float
    cosine: float
    clip_ratio: float
    levels_used: int
    levels_total: int
    entropy_bits: float
    histogram: list[int]  # counts of codes qmin..qmax
    qmin: int


@dataclass(frozen=True)
class LayerStats:
    """Everything measured on one quantized layer."""

    index: int
    name: str
    kind: str
    params: int
    weight: TensorStats
    input: TensorStats | None
    local_sqnr_db: float  # this layer's own error: its float op on its float input vs quantized
    output_sqnr_db: float  # accumulated error: vs the float reference model at this layer
    output_sqnr_bypass_db: float  # vs the same trained weights with every quantizer bypassed
    output_cosine: float


@dataclass(frozen=True)
class Score:
    """Top-1 (percent) and mean cross-entropy of a model on the report's images."""

    top1: float
    loss: float


@dataclass(frozen=True)
class Reference:
    """Which float model the accumulated (output) error is measured against, and why."""

    kind: str  # "float_checkpoint" or "bypass"
    detail: str


@dataclass(frozen=True)
class LayerSensitivity:
    """Accuracy effect of one layer's quantizers (its weight and its input quantizer)."""

    name: str
    alone: Score  # only this layer quantized, all others float
    all_but: Score  # everything quantized except this layer


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivity of ``subject``, and the recipe it suggests."""

    subject: Reference  # which quantized model was probed (see docs/report.md)
    quantized_score: Score  # every layer quantized
    float_score: Score  # every quantizer bypassed
    layers: list[LayerSensitivity]
    suggested_recipe: Recipe  # the run's recipe with the most costly layers raised
    raised: dict[str, int]  # layer name -> bits in the suggested recipe

    def entry(self, name: str) -> LayerSensitivity:
        return next(e for e in self.layers if e.name == name)

    def loss_added(self, name: str) -> float:
        """Loss increase when only ``name`` is quantized: the layer's own cost."""
        return self.entry(name).alone.loss - self.float_score.loss

    def loss_recovered(self, name: str) -> float:
        """Loss drop when every layer but ``name`` is quantized."""
        return self.quantized_score.loss - self.entry(name).all_but.loss


@dataclass(frozen=True)
class LayerDelta:
    """Per-layer differences ``this run - other run`` (None where a layer is in one run only)."""

    name: str
    in_this: bool
    in_other: bool
    deltas: dict[str, float | None]


@dataclass(frozen=True)
class Comparison:
    other_run: str
    other_recipe: str
    other_reference: Reference  # the other run's float reference (its out dB are against it)
    this_score: Score
    other_score: Score
    layers: list[LayerDelta]
    other_layers: list[LayerStats]


@dataclass
class PlotSamples:
    """Raw values kept for the histograms of the worst layers (not written to JSON)."""

    weights_in_steps: dict[str, torch.Tensor] = field(default_factory=dict)  # w / step
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # input values before quant


@dataclass
class Report:
    """A whole per-layer quantization error audit of one run."""

    run: str
    model: str
    recipe: str
    data: str
    images: int
    reference: Reference
    quantized_score: Score
    float_score: Score  # the reference model (see ``reference``)
    bypass_score: Score  # the trained weights with every quantizer bypassed
    layers: list[LayerStats]
    ranking_by: str
    ranking: list[str]  # layer names, worst first
    sensitivity: Sensitivity | None = None
    comparison: Comparison | None = None
    samples: PlotSamples = field(default_factory=PlotSamples)

    def layer(self, name: str) -> LayerStats:
        return next(entry for entry in self.layers if entry.name == name)

    def ranked_layers(self) -> list[LayerStats]:
        by_name = {entry.name: entry for entry in self.layers}
        return [by_name[name] for name in self.ranking]


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf or NaN: undefined and infinite values are written as null."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value
