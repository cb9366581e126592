"""Layer sensitivity: quantize one layer alone, or all layers but one, and watch top-1 and loss.

A layer's quantizers are its weight quantizer and the activation quantizer on its input. The
float baseline is the probed model with every quantizer bypassed, so each experiment differs
from its baseline only in the quantizers it switches. Which model is probed is the caller's
choice (see :func:`mecqtk.report.build.sensitivity_subject`): after quantization-aware training
the weights are co-adapted with their quantizers and bypassing any of them hurts, so the
meaningful subject is the float model the run started from, with calibrated quantizers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from mecqtk.quant import Mode
from mecqtk.recipe import LayerMatch, LayerRule, QuantizerOverride, Recipe
from mecqtk.report.result import LayerSensitivity, Reference, Score, Sensitivity
from mecqtk.report.sites import Site, find_sites, quantizer_modes

Batch = tuple[torch.Tensor, torch.Tensor]

# Bit widths a raised layer gets: the next of these above its current width.
RAISE_TO = (4, 8)


@torch.no_grad()
def score(model: torch.nn.Module, batches: list[Batch], device: torch.device | str) -> Score:
    correct, loss, count = 0, 0.0, 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        correct += int((logits.argmax(dim=1) == labels).sum())
        loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        count += labels.numel()
    return Score(top1=100.0 * correct / count, loss=loss / count)


def measure_sensitivity(
    qmodel: fx.GraphModule,
    sites: list[Site],
    batches: list[Batch],
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> list[LayerSensitivity]:
    """Score the model with only each layer quantized, and with all but each layer quantized.

    Costs ``2 * len(sites)`` passes over ``batches``.

    Example:
        >>> entries = measure_sensitivity(qmodel, find_sites(qmodel), batches)  # doctest: +SKIP
    """
    qmodel.eval()
    entries = []
    for site in sites:
        own = site.quantizers()
        with quantizer_modes(qmodel, Mode.BYPASS, [(q, Mode.QUANTIZE) for q in own]):
            alone = score(qmodel, batches, device)
        with quantizer_modes(qmodel, Mode.QUANTIZE, [(q, Mode.BYPASS) for q in own]):
            all_but = score(qmodel, batches, device)
        entries.append(LayerSensitivity(site.name, alone=alone, all_but=all_but))
        if progress is not None:
            progress(1)
    return entries


def rank_by_sensitivity(float_score: Score, quantized: Score,
                        entries: list[LayerSensitivity]) -> list[str]:
    """Layer names, the most costly first.

    The key is the loss added by quantizing the layer alone: it stays informative at 2 bits,
    where quantizing all but one layer leaves every model nearly as broken as the next. Ties
    (and near-equal costs) are broken by the loss recovered keeping only that layer float.
    """
    def cost(entry: LayerSensitivity) -> tuple[float, float]:
        return (entry.alone.loss - float_score.loss, quantized.loss - entry.all_but.loss)
    return [entry.name for entry in sorted(entries, key=cost, reverse=True)]


def name_pattern(name: str) -> str:
    """A recipe ``match.name`` that selects exactly the module ``name``."""
    if any(ch in name for ch in "*?[]"):
        return "re:" + re.escape(name)
    return name


def suggest_recipe(recipe: Recipe, sites: list[Site], ranking: list[str],
                   raise_top: int) -> tuple[Recipe, dict[str, int]]:
    """``recipe`` with the ``raise_top`` most costly layers that are below 8 bits raised.

    Each raised layer gets the next width in :data:`RAISE_TO` above its widest quantizer for
    both its weight and its input; 8-bit steps are calibrated, not learned (like the defaults).
    The new rules go first, so they win over the recipe's own rules for those layers.

    Example:
        >>> mixed, raised = suggest_recipe(recipe, sites, ranking, raise_top=3)  # doctest: +SKIP
        >>> raised  # doctest: +SKIP
        {'layer3.2.conv2': 4, 'layer1.0.conv1': 4, 'layer3.0.conv1': 4}
    """
    by_name = {site.name: site for site in sites}
    raised: dict[str, int] = {}
    for name in ranking:
        if len(raised) >= raise_top:
            break
        bits = max(q.bits for q in by_name[name].quantizers())
        target = next((b for b in RAISE_TO if b > bits), None)
        if target is not None:
            raised[name] = target
    rules = tuple(
        LayerRule(
            match=LayerMatch(name=name_pattern(name)),
            weight=QuantizerOverride(bits=bits, learn_step=False if bits == 8 else None),
            activation=QuantizerOverride(bits=bits, learn_step=False if bits == 8 else None),
        )
        for name, bits in raised.items()
    )
    summary = ", ".join(f"{name} -> {bits} bits" for name, bits in raised.items()) or "none"
    mixed = replace(
        recipe,
        name=f"{recipe.name}_mixed" if recipe.name else "mixed",
        description=f"{recipe.description} | mecqtk report --sensitivity raised: {summary}".strip(
            " |"),
        quant=replace(recipe.quant, rules=rules + recipe.quant.rules),
    )
    return mixed, raised


def sensitivity_report(
    subject: fx.GraphModule,
    about: Reference,
    batches: list[Batch],
    recipe: Recipe,
    *,
    raise_top: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[Sensitivity, list[str]]:
    """Sensitivity of every layer of ``subject``, the ranking it gives, the suggested recipe.

    Example:
        >>> sensitivity, ranking = sensitivity_report(  # doctest: +SKIP
        ...     calibrated, Reference("float_checkpoint", "..."), batches, recipe, raise_top=3)
    """
    sites = find_sites(subject)
    with quantizer_modes(subject, Mode.QUANTIZE):
        quantized = score(subject, batches, device)
    with quantizer_modes(subject, Mode.BYPASS):
        float_score = score(subject, batches, device)
    entries = measure_sensitivity(subject, sites, batches, device, progress)
    ranking = rank_by_sensitivity(float_score, quantized, entries)
    mixed, raised = suggest_recipe(recipe, sites, ranking, raise_top)
    return Sensitivity(subject=about, quantized_score=quantized, float_score=float_score,
                       layers=entries, suggested_recipe=mixed, raised=raised), ranking
