"""The quantized layers of a prepared model, each with the quantizers that feed it.

A *site* is one quantized Conv/Linear: its :class:`QuantizedLayer` (weight quantizer inside) and
the activation quantizer on its input. Activation quantizers are shared between layers that
read the same value with the same spec, so two sites may name the same input quantizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from mecqtk.errors import MecqtkError
from mecqtk.graph.introspect import quantized_layers
from mecqtk.quant import FakeQuantizer, Mode, QuantizedLayer


@dataclass(frozen=True)
class Site:
    """One quantized layer of a prepared model."""

    index: int  # position among the quantized layers, in graph order
    name: str  # module name, as recipe rules match it (layer1.0.conv1)
    kind: str  # conv or linear
    layer: QuantizedLayer
    input_name: str | None  # the activation quantizer's module name (aq_<node>), None if none
    input_quantizer: FakeQuantizer | None

    @property
    def weight_quantizer(self) -> FakeQuantizer:
        return self.layer.weight_quantizer

    def quantizers(self) -> list[FakeQuantizer]:
        own = [self.weight_quantizer]
        return own + ([self.input_quantizer] if self.input_quantizer is not None else [])


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """The quantized layers of ``gm`` (from :func:`mecqtk.prepare`) in execution order, as
    :func:`~mecqtk.graph.introspect.quantized_layers` lists them: those of the top graph, of the
    graphs traced inside leaf modules, and the eager layers that leaf code calls directly.

    Example:
        >>> [s.name for s in find_sites(qmodel)][:2]  # doctest: +SKIP
        ['conv1', 'layer1.0.conv1']
    """
    sites = [Site(index, layer.name, layer.kind, layer.layer, layer.input_name,
                  layer.input_quantizer)
             for index, layer in enumerate(quantized_layers(gm))]
    if not sites:
        raise MecqtkError("the model has no quantized layers; is this a mecqtk run's model?")
    return sites


def all_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


@contextmanager
def quantizer_modes(model: nn.Module, default: Mode,
                    overrides: Iterable[tuple[FakeQuantizer, Mode]] = ()) -> Iterator[None]:
    """Put every quantizer of ``model`` in ``default`` mode (some in another), restore on exit.

    Example:
        >>> with quantizer_modes(qmodel, Mode.BYPASS):  # doctest: +SKIP
        ...     float_logits = qmodel(images)
    """
    quantizers = all_quantizers(model)
    saved = [q.mode for q in quantizers]
    try:
        for quantizer in quantizers:
            quantizer.mode = default
        for quantizer, mode in overrides:
            quantizer.mode = mode
        yield
    finally:
        for quantizer, mode in zip(quantizers, saved, strict=True):
            quantizer.mode = mode
