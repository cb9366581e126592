"""What a prepared model quantizes, layer by layer, and what it leaves float and why.

Built from the annotations (node metadata of every graph, eager-layer decisions) and checked
against the original model, so a Conv/Linear that the graph never calls (unused, or whose weight
is read by functional code) is reported instead of silently staying float.

This is the plan (what annotate decided and insert built), known before any data is seen; the
:mod:`mecqtk.report` package measures the errors of a trained model's layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from mecqtk.graph.introspect import annotations_in_order
from mecqtk.graph.meta import JunctionQuant, LayerQuant, NodeQuant, graph_info
from mecqtk.graph.ops import LAYER_KINDS
from mecqtk.quant.modules import QuantizedLayer, is_quantizable_layer, layer_kind

NOT_CALLED = "never called as a module by the traced forward (unused, or read by functional code)"


@dataclass(frozen=True)
class LayerRow:
    """One quantizable layer or op of the model.

    ``op`` is the layer class with its conv shape (``Conv2d 3x3 dw``) or the op's kind;
    ``inputs`` holds one entry per quantized operand ("-" where an operand is left as is);
    ``float_reason`` is None when the row is quantized. ``eager`` marks layers run by leaf code
    (quantized by module swap, input quantizer included).
    """

    name: str
    kind: str
    op: str
    weight: str | None
    inputs: tuple[str, ...]
    output: str | None
    float_reason: str | None = None
    eager: bool = False

    @property
    def quantized(self) -> bool:
        return self.float_reason is None


@dataclass(frozen=True)
class QuantReport:
    rows: tuple[LayerRow, ...]
    auto_leaves: tuple[str, ...]

    @property
    def layers(self) -> list[LayerRow]:
        return [r for r in self.rows if r.kind in LAYER_KINDS]

    @property
    def layers_total(self) -> int:
        return len(self.layers)

    @property
    def layers_quantized(self) -> int:
        return sum(r.quantized for r in self.layers)

    @property
    def layers_float(self) -> list[LayerRow]:
        return [r for r in self.layers if not r.quantized]


def describe_layer(layer: nn.Module) -> str:
    """``Conv2d 3x3 dw``, ``StdConv2d 1x1 g4``, ``Linear``: class, kernel and grouping."""
    if isinstance(layer, QuantizedLayer):
        layer = layer.layer
    text = type(layer).__name__
    if isinstance(layer, nn.modules.conv._ConvNd):
        text += " " + "x".join(str(k) for k in layer.kernel_size)
        if layer.groups > 1:
            depthwise = layer.groups == layer.in_channels
            text += " dw" if depthwise else f" g{layer.groups}"
    return text


def _row(name: str, quant: NodeQuant, op: str, eager: bool = False) -> LayerRow:
    weight = quant.weight if isinstance(quant, LayerQuant) else None
    output = quant.output if isinstance(quant, JunctionQuant) else None
    return LayerRow(
        name=name,
        kind=quant.kind,
        op=op,
        weight=weight.describe() if weight else None,
        inputs=tuple(s.describe() for s in quant.inputs if s is not None),
        output=output.describe() if output else None,
        float_reason=quant.skipped,
        eager=eager,
    )


def _annotated_rows(qmodel: fx.GraphModule, originals: dict[str, nn.Module]) -> list[LayerRow]:
    """Rows in execution order (see :func:`~mecqtk.graph.introspect.annotations_in_order`)."""
    rows: list[LayerRow] = []
    for annotation in annotations_in_order(qmodel):
        name, quant = annotation.name, annotation.quant
        if annotation.eager:
            rows.append(_row(name, quant, describe_layer(qmodel.get_submodule(name)), eager=True))
            continue
        op = (describe_layer(originals.get(name) or qmodel.get_submodule(name))
              if quant.kind in LAYER_KINDS else quant.kind)
        if isinstance(quant, LayerQuant) and quant.weight_input is not None:
            op += " (functional)"
        if isinstance(quant, LayerQuant) and quant.bn is not None:
            op += " + folded BN"
        rows.append(_row(name, quant, op))
    return rows


def quant_report(model: nn.Module, qmodel: fx.GraphModule) -> QuantReport:
    """Rows for every annotated layer/op of ``qmodel`` (prepared from ``model``) in execution
    order, then a float row for every Conv/Linear of ``model`` that no annotation covers.

    Example:
        >>> report = quant_report(model, prepare(model, recipe))
        >>> report.layers_quantized == report.layers_total
        True
    """
    rows: dict[str, LayerRow] = {}
    for row in _annotated_rows(qmodel, dict(model.named_modules())):
        rows.setdefault(row.name, row)
    for name, module in model.named_modules():
        if is_quantizable_layer(module) and name not in rows:
            rows[name] = LayerRow(name=name, kind=layer_kind(module) or "conv",
                                  op=describe_layer(module),
                                  weight=None, inputs=(), output=None, float_reason=NOT_CALLED)
    return QuantReport(rows=tuple(rows.values()), auto_leaves=graph_info(qmodel).auto_leaves)

