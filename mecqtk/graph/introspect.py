"""Questions asked of a prepared model, each answered once: which layers are quantized (in nested
graphs and inside leaf modules too), which activation quantizer feeds each, which quantizers are
there for activations and which for weights, which BatchNorm a layer can absorb, and where the
pooled features are.

Graph passes, the convert stage, the report and the training terms all ask these; they call
here instead of walking the model with rules of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.graph.meta import LayerQuant, NodeQuant, annotated_nodes, get_quant, graph_info
from mecqtk.graph.ops import (
    ALIAS_MODULES,
    LAYER_KINDS,
    node_arguments,
    node_kind,
    preserves_grid,
    rearranges_values,
    selects_values,
)
from mecqtk.quant.bn_fold import BatchNorm
from mecqtk.quant.modules import LayerKind, QuantizedLayer, layer_weight_quantizers
from mecqtk.quant.quantizers import FakeQuantizer


def graph_modules(root: fx.GraphModule) -> Iterator[tuple[str, fx.GraphModule]]:
    """``root`` and every GraphModule nested in it, with its qualified name, outermost first."""
    yield "", root
    for name, module in root.named_modules():
        if name and isinstance(module, fx.GraphModule):
            yield name, module


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class Annotation:
    """One annotated layer or op of a model, wherever it sits.

    ``name`` is the qualified module name (as recipe rules and the original model name it);
    ``graph`` is the GraphModule whose node carries the decision or whose leaf call runs the eager
    layer, ``prefix`` that graph's qualified name; ``node`` is None for an eager layer.
    """

    name: str
    quant: NodeQuant
    graph: fx.GraphModule
    prefix: str
    node: fx.Node | None

    @property
    def eager(self) -> bool:
        return self.node is None


def annotations_in_order(root: fx.GraphModule) -> Iterator[Annotation]:
    """Every annotation of ``root`` in execution order: graph order, with the interior of each
    leaf module (its nested graphs and eager layers) spliced in where the leaf is called.

    Example:
        >>> [a.name for a in annotations_in_order(prepare(model, recipe))][:2]  # doctest: +SKIP
        ['conv1', 'layer1.0.conv1']
    """

    def in_graph(gm: fx.GraphModule, prefix: str) -> Iterator[Annotation]:
        eager = graph_info(gm).eager_layers
        for node in gm.graph.nodes:
            quant = get_quant(node)
            if quant is not None:
                yield Annotation(qualified(prefix, quant.module_name), quant, gm, prefix, node)
            elif node.op == "call_module":
                module = gm.get_submodule(node.target)
                if not isinstance(module, FakeQuantizer):
                    yield from in_leaf(gm, module, str(node.target), prefix, eager)

    def in_leaf(gm: fx.GraphModule, module: nn.Module, local: str, prefix: str,
                eager: dict[str, LayerQuant]) -> Iterator[Annotation]:
        if local in eager:
            yield Annotation(qualified(prefix, local), eager[local], gm, prefix, None)
            return
        for child_name, child in module.named_children():
            path = f"{local}.{child_name}"
            if isinstance(child, fx.GraphModule):
                yield from in_graph(child, qualified(prefix, path))
            else:
                yield from in_leaf(gm, child, path, prefix, eager)

    yield from in_graph(root, "")


def passes_grid_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output lies on its input's grid: a max pool, or an alias module
    (:data:`ALIAS_MODULES`)."""
    if preserves_grid(node, modules):
        return True
    return node.op == "call_module" and isinstance(modules[str(node.target)], ALIAS_MODULES)


def grid_quantizer(value: object, modules: dict[str, nn.Module],
                   through_selections: bool = False) -> tuple[str, FakeQuantizer] | None:
    """The activation quantizer whose grid ``value`` lies on, with its module name in the
    value's graph: the value itself, or a quantizer reached back through max pools and alias
    modules (and, ``through_selections``, slices and zero pads, see
    :func:`~mecqtk.graph.ops.selects_values`). None when a value on the way is computed (it is on
    no grid)."""
    source = value
    while isinstance(source, fx.Node):
        if source.op == "call_module":
            module = modules[str(source.target)]
            if isinstance(module, FakeQuantizer):
                return str(source.target), module
        if not (passes_grid_through(source, modules)
                or (through_selections and selects_values(source, modules))):
            return None
        source = source.args[0] if source.args else None
    return None


def feeding_quantizer(node: fx.Node,
                      modules: dict[str, nn.Module]) -> tuple[str, FakeQuantizer] | None:
    """The activation quantizer whose grid ``node``'s first argument lies on (see
    :func:`grid_quantizer`)."""
    return grid_quantizer(node.args[0] if node.args else None, modules)


@dataclass(frozen=True)
class QuantizedLayerSite:
    """One quantized Conv/Linear of a prepared model, and the activation quantizer on its input.

    ``input_name`` is the quantizer's qualified module name: ``aq_<node>`` in the layer's graph,
    or ``<layer>.input_quantizer`` for an eager layer (called by leaf code), which carries its
    own. Activation quantizers are shared, so two layers may name the same one.
    """

    name: str
    kind: LayerKind
    layer: QuantizedLayer
    annotation: Annotation
    input_name: str | None
    input_quantizer: FakeQuantizer | None


def layer_input_quantizer(annotation: Annotation,
                          layer: QuantizedLayer) -> tuple[str, FakeQuantizer] | None:
    """The activation quantizer feeding one annotated layer, with its qualified name."""
    if annotation.node is None:
        if layer.input_quantizer is None:
            return None
        return f"{annotation.name}.input_quantizer", layer.input_quantizer
    found = feeding_quantizer(annotation.node, dict(annotation.graph.named_modules()))
    if found is None:
        return None
    return qualified(annotation.prefix, found[0]), found[1]


def quantized_layers(gm: fx.GraphModule) -> list[QuantizedLayerSite]:
    """The quantized layers of ``gm`` (from :func:`mecqtk.prepare`) in execution order:
    those of the top graph, of the graphs traced inside leaf modules, and the eager layers that
    leaf code calls directly. A layer called more than once is listed once; functional layers
    (``F.linear`` of a layer's weight) are not modules and are not listed.

    Example:
        >>> [site.name for site in quantized_layers(qmodel)][:2]  # doctest: +SKIP
        ['conv1', 'layer1.0.conv1']
    """
    sites: list[QuantizedLayerSite] = []
    seen: set[str] = set()
    for annotation in annotations_in_order(gm):
        quant = annotation.quant
        if (not isinstance(quant, LayerQuant) or not quant.quantized or quant.weight is None
                or annotation.name in seen):
            continue
        layer = gm.get_submodule(annotation.name)
        if not isinstance(layer, QuantizedLayer):
            continue
        seen.add(annotation.name)
        found = layer_input_quantizer(annotation, layer)
        kind: LayerKind = "linear" if quant.kind == "linear" else "conv"
        sites.append(QuantizedLayerSite(annotation.name, kind, layer, annotation,
                                        found[0] if found else None,
                                        found[1] if found else None))
    return sites


def _functional_weight_quantizers(gm: fx.GraphModule, prefix: str) -> dict[str, FakeQuantizer]:
    """The quantizers a graph puts on weights passed to ``F.linear``/``F.conv*d`` (``wq_*``)."""
    found: dict[str, FakeQuantizer] = {}
    for node, quant in annotated_nodes(gm):
        if not isinstance(quant, LayerQuant) or quant.weight_input is None or not quant.quantized:
            continue
        weight = node_arguments(node)[quant.weight_input]
        module = gm.get_submodule(str(weight.target)) if weight.op == "call_module" else None
        if isinstance(module, FakeQuantizer):
            found[qualified(prefix, str(weight.target))] = module
    return found


def weight_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every weight quantizer of ``model`` by qualified name: those inside quantized layers and
    those a graph puts on the weight of a functional layer."""
    found = layer_weight_quantizers(model)
    for prefix, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            found.update(_functional_weight_quantizers(module, prefix))
    return found


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every activation quantizer of ``model`` by qualified name, in module order: the graph
    ones (``aq_*``, also in nested graphs) and the input quantizers of eager layers; that is,
    every quantizer that is not a weight quantizer."""
    weights = {id(q) for q in weight_quantizers(model).values()}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, FakeQuantizer) and id(module) not in weights}


def batchnorm_user(node: fx.Node, modules: dict[str, nn.Module],
                   channels: int) -> fx.Node | None:
    """The BatchNorm node that is ``node``'s only user, with running statistics over its
    ``channels`` output channels: the BatchNorm a layer's weights can absorb. (Training folds it
    only when the BN runs once and the layer's form is known, see
    :func:`~mecqtk.quant.bn_fold.can_fold`; the export only in eval mode.)"""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module":
        return None
    bn = modules[str(user.target)]
    if not isinstance(bn, BatchNorm) or bn.running_mean is None or bn.num_features != channels:
        return None
    return user


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a plain ReLU (module, function or method)."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _passes_on_unchanged_or_relu(bn: nn.Module) -> bool | None:
    """What a (timm BatchNormAct2d-style) normalisation layer does after normalising, once its
    BatchNorm is absorbed: None when something other than dropout and a ReLU, else whether a
    ReLU."""
    relu = False
    for name in ("drop", "act"):
        part = getattr(bn, name, None)
        if part is None or isinstance(part, ALIAS_MODULES):
            continue
        if not isinstance(part, nn.ReLU):
            return None
        relu = True
    return relu


def requantizing_quantizer(node: fx.Node, modules: dict[str, nn.Module],
                           batchnorm: fx.Node | None) -> tuple[FakeQuantizer, bool] | None:
    """The activation quantizer that reads a layer's output directly, and whether a ReLU sits
    between them.

    Between ``node`` (the layer) and the quantizer there may be only ``batchnorm`` (the
    BatchNorm the layer absorbs), one ReLU and ops that only rearrange values (a ViT's patch
    embedding: flatten, transpose), each with one user. That group is what an integer runtime
    runs as one kernel that requantizes its int32 accumulator (onnxruntime's QLinearConv: it
    moves the QuantizeLinear back over the rearranging ops). None when the output goes anywhere
    else.
    """
    current, relu = node, False
    if batchnorm is not None:
        if set(node.users) != {batchnorm}:
            return None
        tail = _passes_on_unchanged_or_relu(modules[str(batchnorm.target)])
        if tail is None:
            return None
        current, relu = batchnorm, tail
    while len(current.users) == 1:
        user = next(iter(current.users))
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, FakeQuantizer):
            return module, relu
        if rearranges_values(user, modules):
            current = user
            continue
        if relu or not is_relu(user, modules):
            return None
        current, relu = user, True
    return None


def pooled_features_node(gm: fx.GraphModule) -> fx.Node | None:
    """The value the last Conv/Linear of ``gm``'s graph reads: the pooled penultimate features.

    In a quantized graph that is the activation quantizer's output (the features the integer
    classifier sees); in a float graph (the teacher) the same place before quantization.
    """
    annotated = [n for n, q in annotated_nodes(gm) if q.kind in LAYER_KINDS]
    if annotated:
        layers = annotated
    else:
        modules = dict(gm.named_modules())
        layers = [n for n in gm.graph.nodes if node_kind(n, modules) in LAYER_KINDS]
    if not layers:
        return None
    source = layers[-1].args[0]
    return source if isinstance(source, fx.Node) else None
