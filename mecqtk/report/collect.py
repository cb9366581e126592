"""Per-layer measurements taken with forward hooks while the images pass through three models.

For every batch the same images go through (1) the quantized model with every quantizer
bypassed, (2) the float reference model when the run has one, and (3) the quantized model.
Hooks on the layers keep the outputs of (1) and (2); during (3) each layer's output is compared
with them (the accumulated error), its input quantizer compares what it receives with what it
emits, and the layer's float operation is re-run on the unquantized input to isolate the error
this layer alone adds (the local error).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.export.deploy_eval import float_layer_outputs
from mecqtk.quant import FakeQuantizer, Mode
from mecqtk.report.metrics import ErrorStats, LevelStats, ValueSample, unclamped_codes
from mecqtk.report.result import LayerStats, PlotSamples, Score, StepStats, TensorStats
from mecqtk.report.sites import Site, quantizer_modes

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Collected:
    layers: list[LayerStats]
    quantized_score: Score
    float_score: Score
    bypass_score: Score
    samples: PlotSamples


@dataclass
class _ScoreSum:
    correct: int = 0
    loss: float = 0.0
    count: int = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.count += labels.numel()

    def score(self) -> Score:
        return Score(top1=100.0 * self.correct / self.count, loss=self.loss / self.count)


@dataclass
class _InputProbe:
    quantizer: FakeQuantizer
    error: ErrorStats = field(default_factory=ErrorStats)
    levels: LevelStats = field(init=False)
    sample: ValueSample = field(default_factory=ValueSample)

    def __post_init__(self) -> None:
        self.levels = LevelStats(self.quantizer.qmin, self.quantizer.qmax)


def _step_and_zero_point(quantizer: FakeQuantizer, x: torch.Tensor):
    zero_point = quantizer.zero_point()
    return (quantizer.broadcast(quantizer.step_size().detach(), x),
            None if zero_point is None else quantizer.broadcast(zero_point.detach(), x))


def _step_stats(quantizer: FakeQuantizer) -> StepStats:
    step = quantizer.step_size().detach().double()
    return StepStats(count=step.numel(), min=float(step.min()), mean=float(step.mean()),
                     max=float(step.max()))


def _tensor_stats(name: str, quantizer: FakeQuantizer, error: ErrorStats,
                  levels: LevelStats) -> TensorStats:
    return TensorStats(
        quantizer=name, bits=quantizer.bits, signed=quantizer.signed,
        granularity=quantizer.spec.granularity, step=_step_stats(quantizer),
        sqnr_db=error.sqnr_db(), mse=error.mse(), cosine=error.cosine(),
        clip_ratio=levels.clip_ratio(), levels_used=levels.used(), levels_total=levels.total,
        entropy_bits=levels.entropy_bits(), histogram=list(levels.histogram), qmin=levels.qmin,
    )


@torch.no_grad()
def weight_stats(site: Site) -> tuple[TensorStats, torch.Tensor]:
    """Error and grid usage of a layer's weight, and the weight in units of its step."""
    quantizer = site.weight_quantizer
    weight = site.layer.layer.weight.detach()
    with quantizer_modes(quantizer, Mode.QUANTIZE):
        quantized = quantizer(weight)
    step, zero_point = _step_and_zero_point(quantizer, weight)
    error = ErrorStats()
    error.update(weight, quantized)
    levels = LevelStats(quantizer.qmin, quantizer.qmax)
    levels.update(unclamped_codes(weight, step, zero_point))
    name = f"{site.name}.weight_quantizer"
    return _tensor_stats(name, quantizer, error, levels), (weight / step).reshape(-1).cpu()


class _Hooks:
    """The hooks of one collection, and the per-batch values they hand to each other."""

    def __init__(self, qmodel: fx.GraphModule, sites: list[Site],
                 float_model: nn.Module | None) -> None:
        self.sites = sites
        self.phase = ""
        self.bypass_outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.float_outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.float_inputs: dict[str, torch.Tensor] = {}
        self.inputs = {s.input_name: _InputProbe(s.input_quantizer) for s in sites
                       if s.input_name is not None and s.input_quantizer is not None}
        self.local = {s.name: ErrorStats() for s in sites}
        self.vs_float = {s.name: ErrorStats() for s in sites}
        self.vs_bypass = {s.name: ErrorStats() for s in sites}
        self.handles = []
        for name, probe in self.inputs.items():
            self.handles.append(probe.quantizer.register_forward_hook(self._input_hook(name)))
        for site in sites:
            self.handles.append(site.layer.register_forward_hook(self._layer_hook(site)))
            if float_model is not None:
                float_layer = float_model.get_submodule(site.name)
                self.handles.append(float_layer.register_forward_hook(self._float_hook(site)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _input_hook(self, name: str):
        def hook(module: FakeQuantizer, args, output: torch.Tensor) -> None:
            if self.phase != "quantized":
                return
            x = args[0]
            self.float_inputs[name] = x
            probe = self.inputs[name]
            probe.error.update(x, output)
            probe.levels.update(unclamped_codes(x, *_step_and_zero_point(module, x)))
            probe.sample.update(x)
        return hook

    def _float_hook(self, site: Site):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            self.float_outputs[site.name].append(output.detach())
        return hook

    def _layer_hook(self, site: Site):
        def hook(module, args, output: torch.Tensor) -> None:
            if self.phase == "bypass":
                self.bypass_outputs[site.name].append(output.detach())
                return
            if self.phase != "quantized":
                return
            unquantized_input = self.float_inputs.get(site.input_name or "", args[0])
            self.local[site.name].update(module.layer(unquantized_input), output)
            bypassed = self.bypass_outputs[site.name].pop(0)
            self.vs_bypass[site.name].update(bypassed, output)
            queue = self.float_outputs.get(site.name)
            self.vs_float[site.name].update(queue.pop(0) if queue else bypassed, output)
        return hook

    def end_batch(self) -> None:
        self.float_inputs.clear()
        self.bypass_outputs.clear()
        self.float_outputs.clear()


@torch.no_grad()
def collect(qmodel: fx.GraphModule, sites: list[Site], batches: Iterable[Batch],
            float_model: nn.Module | None = None,
            device: torch.device | str = "cpu") -> Collected:
    """Measure every site over ``batches``; ``float_model`` None means the bypassed model.

    Example:
        >>> collected = collect(qmodel, find_sites(qmodel), batches)  # doctest: +SKIP
        >>> collected.layers[0].local_sqnr_db  # doctest: +SKIP
    """
    qmodel.eval()
    if float_model is not None:
        float_model.eval()
    hooks = _Hooks(qmodel, sites, float_model)
    scores = {"quantized": _ScoreSum(), "float": _ScoreSum(), "bypass": _ScoreSum()}
    # each layer's own output is compared with its float twin's: no BatchNorm folded into it
    with float_layer_outputs(qmodel):
        try:
            for images, labels in batches:
                images, labels = images.to(device), labels.to(device)
                hooks.phase = "bypass"
                with quantizer_modes(qmodel, Mode.BYPASS):
                    bypass_logits = qmodel(images)
                scores["bypass"].update(bypass_logits, labels)
                hooks.phase = "float"
                float_logits = float_model(images) if float_model is not None else bypass_logits
                scores["float"].update(float_logits, labels)
                hooks.phase = "quantized"
                with quantizer_modes(qmodel, Mode.QUANTIZE):
                    scores["quantized"].update(qmodel(images), labels)
                hooks.end_batch()
        finally:
            hooks.phase = ""
            hooks.remove()
    samples = PlotSamples()
    layers = []
    for site in sites:
        weight, in_steps = weight_stats(site)
        samples.weights_in_steps[site.name] = in_steps
        probe = hooks.inputs.get(site.input_name or "")
        inputs = None
        if probe is not None and site.input_name is not None:
            inputs = _tensor_stats(site.input_name, probe.quantizer, probe.error, probe.levels)
            samples.inputs[site.name] = probe.sample.values()
        layers.append(LayerStats(
            index=site.index, name=site.name, kind=site.kind,
            params=sum(p.numel() for p in site.layer.layer.parameters()),
            weight=weight, input=inputs,
            local_sqnr_db=hooks.local[site.name].sqnr_db(),
            output_sqnr_db=hooks.vs_float[site.name].sqnr_db(),
            output_sqnr_bypass_db=hooks.vs_bypass[site.name].sqnr_db(),
            output_cosine=hooks.vs_float[site.name].cosine(),
        ))
    return Collected(layers, scores["quantized"].score(), scores["float"].score(),
                     scores["bypass"].score(), samples)
