"""The mechanical pass: build and insert the quantizers the annotate pass decided on.

No policy lives here: every choice comes from the node's :class:`~mecqtk.graph.meta.NodeQuant`.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from mecqtk.graph.meta import annotated_nodes
from mecqtk.graph.ops import node_arguments, replace_node_argument
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import make_quantizer
from mecqtk.quant.spec import QuantSpec

ACT_PREFIX = "aq_"


def _swap_weight_quantized(gm: fx.GraphModule, name: str, spec: QuantSpec) -> None:
    layer = gm.get_submodule(name)
    if isinstance(layer, QuantizedLayer):
        return
    quantizer = make_quantizer(spec, channels=layer.weight.shape[0], axis=0)
    quantizer.to(layer.weight.device)
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, QuantizedLayer(layer, quantizer))


def _activation_quantizer(
    gm: fx.GraphModule, source: fx.Node, spec: QuantSpec, made: dict[tuple[str, QuantSpec], fx.Node]
) -> fx.Node:
    """The node quantizing ``source`` with ``spec``; one per (value, spec), shared by consumers."""
    key = (source.name, spec)
    if key in made:
        return made[key]
    name = f"{ACT_PREFIX}{source.name}"
    if hasattr(gm, name):
        name = f"{name}_{'s' if spec.signed else 'u'}{spec.bits}"
    gm.add_submodule(name, make_quantizer(spec))
    with gm.graph.inserting_after(source):
        node = gm.graph.call_module(name, (source,))
    made[key] = node
    return node


def insert_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Swap annotated layers for :class:`QuantizedLayer` and quantize their annotated inputs."""
    made: dict[tuple[str, QuantSpec], fx.Node] = {}
    for node, quant in annotated_nodes(gm):
        if not quant.quantized:
            continue
        if quant.weight is not None:
            _swap_weight_quantized(gm, quant.module_name, quant.weight)
        arguments = node_arguments(node)
        for index, spec in enumerate(quant.inputs):
            if spec is None:
                continue
            quantized = _activation_quantizer(gm, arguments[index], spec, made)
            replace_node_argument(node, index, quantized)
        if quant.output is not None:
            users = list(node.users)
            quantized = _activation_quantizer(gm, node, quant.output, made)
            for user in users:
                user.replace_input_with(node, quantized)
    return gm


def activation_quantizers(gm: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in gm.named_children() if n.startswith(ACT_PREFIX)}
