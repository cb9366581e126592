"""The mechanical pass: build and insert the quantizers the annotate pass decided on.

No policy lives here: every choice comes from a :class:`~mecqtk.graph.meta.LayerQuant` or
:class:`~mecqtk.graph.meta.JunctionQuant`, on a node or (for layers run by leaf code) in the
GraphModule's :class:`~mecqtk.graph.meta.GraphInfo`.
"""

from __future__ import annotations

import torch.fx as fx

from mecqtk.graph.introspect import graph_modules
from mecqtk.graph.meta import JunctionQuant, LayerQuant, annotated_nodes, graph_info
from mecqtk.graph.ops import node_arguments, replace_node_argument
from mecqtk.quant.bn_fold import FoldedBNLayer
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import make_quantizer
from mecqtk.quant.spec import QuantSpec

ACT_PREFIX = "aq_"
WEIGHT_PREFIX = "wq_"


def _swap_weight_quantized(
    gm: fx.GraphModule, name: str, spec: QuantSpec, input_spec: QuantSpec | None = None
) -> None:
    layer = gm.get_submodule(name)
    if isinstance(layer, QuantizedLayer):
        return
    device = layer.weight.device
    quantizer = make_quantizer(spec, channels=layer.weight.shape[0], axis=0).to(device)
    input_quantizer = None if input_spec is None else make_quantizer(input_spec).to(device)
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, QuantizedLayer(layer, quantizer, input_quantizer))


def _activation_quantizer(
    gm: fx.GraphModule, source: fx.Node, spec: QuantSpec,
    made: dict[tuple[str, QuantSpec], fx.Node], reads: fx.Node | None = None,
) -> fx.Node:
    """The node quantizing ``source`` with ``spec``; one per (value, spec), shared by consumers.
    It reads ``reads`` when given (another quantizer of ``source``), else ``source`` itself."""
    key = (source.name, spec)
    if key in made:
        return made[key]
    name = f"{ACT_PREFIX}{source.name}"
    if hasattr(gm, name):
        name = f"{name}_{'s' if spec.signed else 'u'}{spec.bits}"
    gm.add_submodule(name, make_quantizer(spec))
    reads = reads or source
    with gm.graph.inserting_after(reads):
        node = gm.graph.call_module(name, (reads,))
    made[key] = node
    return node


def _storage_plan(
    requests: list[tuple[fx.Node, QuantSpec]],
) -> dict[tuple[str, QuantSpec], QuantSpec | tuple[QuantSpec, QuantSpec]]:
    """How each requested (value, spec) is realised when one value is asked for on several grids.

    A deployed graph stores a tensor once, so: requests with the same bits and sign share one
    quantizer (a trainable spec is preferred to a calibrated one, then the first asked for), and
    a narrower grid of the same sign requantizes the widest one's output instead of the float
    value (an 8-bit residual stream feeding a 4-bit conv). Unchained, the integer graph would
    quantize the float value twice and onnxruntime could fuse neither the add before it nor the
    ReLU between them. Maps each request to the spec it uses, or to (widest spec, own spec) when
    it requantizes.
    """
    by_value: dict[str, list[QuantSpec]] = {}
    for source, spec in requests:
        specs = by_value.setdefault(source.name, [])
        if spec not in specs:
            specs.append(spec)
    plan: dict[tuple[str, QuantSpec], QuantSpec | tuple[QuantSpec, QuantSpec]] = {}
    for value, specs in by_value.items():
        chosen: dict[tuple[int, bool], QuantSpec] = {}
        for spec in sorted(specs, key=lambda s: not s.learn_step):  # stable: keeps request order
            chosen.setdefault((spec.bits, spec.signed), spec)
        for spec in specs:
            own = chosen[(spec.bits, spec.signed)]
            widest = max((s for (_, signed), s in chosen.items() if signed == spec.signed),
                         key=lambda s: s.bits)
            plan[(value, spec)] = own if widest is own else (widest, own)
    return plan


def _planned_quantizer(
    gm: fx.GraphModule, source: fx.Node, spec: QuantSpec,
    plan: dict[tuple[str, QuantSpec], QuantSpec | tuple[QuantSpec, QuantSpec]],
    made: dict[tuple[str, QuantSpec], fx.Node],
) -> fx.Node:
    planned = plan.get((source.name, spec), spec)
    if isinstance(planned, QuantSpec):
        return _activation_quantizer(gm, source, planned, made)
    widest, own = planned
    stored = _activation_quantizer(gm, source, widest, made)
    return _activation_quantizer(gm, source, own, made, reads=stored)


def _fold_bn(gm: fx.GraphModule, node: fx.Node, name: str, bn_name: str,
             spec: QuantSpec) -> None:
    """Replace layer ``name`` by a FoldedBNLayer holding BN ``bn_name``; drop the BN node."""
    layer, bn = gm.get_submodule(name), gm.get_submodule(bn_name)
    quantizer = make_quantizer(spec, channels=layer.weight.shape[0], axis=0)
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, FoldedBNLayer(layer, bn, quantizer.to(layer.weight.device)))
    bn_node = next(iter(node.users))
    bn_node.replace_all_uses_with(node)
    gm.graph.erase_node(bn_node)
    gm.delete_submodule(bn_name)


def _quantize_weight_argument(gm: fx.GraphModule, node: fx.Node, index: int, name: str,
                              spec: QuantSpec) -> None:
    """A functional layer (``F.linear(x, self.qkv.weight)``): quantize the weight it is given."""
    weight = node_arguments(node)[index]
    parameter = gm.get_parameter(str(weight.target))
    module_name = WEIGHT_PREFIX + name.replace(".", "_")
    quantizer = make_quantizer(spec, channels=parameter.shape[0], axis=0)
    gm.add_submodule(module_name, quantizer.to(parameter.device))
    with gm.graph.inserting_after(weight):
        quantized = gm.graph.call_module(module_name, (weight,))
    replace_node_argument(node, index, quantized)


def insert_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Swap annotated layers for :class:`QuantizedLayer` and quantize their annotated inputs and
    outputs, in this one graph; then wrap its eager layers."""
    made: dict[tuple[str, QuantSpec], fx.Node] = {}
    annotated = annotated_nodes(gm)
    for node, quant in annotated:  # BN nodes go first: later operands may name them
        if (isinstance(quant, LayerQuant) and quant.quantized and quant.bn is not None
                and quant.weight is not None):
            _fold_bn(gm, node, quant.module_name, quant.bn, quant.weight)
    plan = _storage_plan([
        (node_arguments(node)[index], spec)
        for node, quant in annotated if quant.quantized
        for index, spec in enumerate(quant.inputs) if spec is not None
    ])
    for node, quant in annotated:
        if not quant.quantized:
            continue
        if isinstance(quant, LayerQuant) and quant.weight is not None:
            if quant.weight_input is not None:
                _quantize_weight_argument(gm, node, quant.weight_input, quant.module_name,
                                          quant.weight)
            else:
                _swap_weight_quantized(gm, quant.module_name, quant.weight)
        arguments = node_arguments(node)
        for index, spec in enumerate(quant.inputs):
            if spec is None:
                continue
            quantized = _planned_quantizer(gm, arguments[index], spec, plan, made)
            replace_node_argument(node, index, quantized)
        if isinstance(quant, JunctionQuant) and quant.output is not None:
            users = list(node.users)
            quantized = _activation_quantizer(gm, node, quant.output, made)
            for user in users:
                user.replace_input_with(node, quantized)
    for name, quant in graph_info(gm).eager_layers.items():
        if quant.quantized and quant.weight is not None:
            input_spec = quant.inputs[0] if quant.inputs else None
            _swap_weight_quantized(gm, name, quant.weight, input_spec)
    return gm


def insert_model(gm: fx.GraphModule) -> fx.GraphModule:
    """:func:`insert_quantizers` in every graph of the model, innermost first."""
    for _, sub in reversed(list(graph_modules(gm))):
        insert_quantizers(sub)
    return gm

