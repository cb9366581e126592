"""Open up leaf modules, so that no Conv/Linear inside them stays float.

A leaf runs its own forward eagerly, out of the tracer's sight. :func:`trace_leaf_interiors`
walks into every leaf that holds Conv/Linear layers and replaces each traceable descendant by its
own traced GraphModule (whose nodes the passes annotate like the top graph's). Descendants that do
not trace are walked into in turn; containers (Sequential, ModuleList, ModuleDict) and declared
leaves are always walked into, never traced whole. What is left are *eager layers*: Conv/Linear
called directly by leaf code. They are listed so the annotate pass can decide for them and the
insert pass can wrap each in a QuantizedLayer that also quantizes its input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from mecqtk.errors import GraphError
from mecqtk.graph.meta import NodeQuant, get_quant, graph_info
from mecqtk.graph.tracer import is_declared_leaf, trace
from mecqtk.quant.modules import QuantizedLayer, is_quantizable_layer
from mecqtk.quant.quantizers import FakeQuantizer

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PLAIN_ATTRIBUTE_TYPES = (int, float, bool, str, tuple, type(None))


def holds_layers(module: nn.Module) -> bool:
    return any(is_quantizable_layer(m) for m in module.modules())


def is_layer(module: nn.Module) -> bool:
    return is_quantizable_layer(module) or isinstance(module, QuantizedLayer)


def _keep_plain_attributes(original: nn.Module, traced: fx.GraphModule) -> None:
    """Leaf code may read ``self.attn.num_heads``: copy such plain attributes to the traced copy."""
    for key, value in vars(original).items():
        if key.startswith("_") or key in vars(traced) or key == "training":
            continue
        if isinstance(value, _PLAIN_ATTRIBUTE_TYPES):
            setattr(traced, key, value)


class _Opener:
    def __init__(self, leaf_classes: Iterable[str], auto_leaf: bool) -> None:
        self.leaf_classes = tuple(leaf_classes)
        self.auto_leaf = auto_leaf

    def open_graph(self, gm: fx.GraphModule) -> None:
        """Open every leaf called by ``gm``'s graph that holds layers."""
        opened: set[int] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if is_layer(module) or id(module) in opened or not holds_layers(module):
                continue
            opened.add(id(module))
            self.open_module(module)

    def open_module(self, module: nn.Module) -> None:
        """Replace each traceable child of an eagerly run ``module`` by its traced form."""
        for name, child in list(module.named_children()):
            if is_layer(child) or not holds_layers(child):
                continue
            if isinstance(child, _CONTAINERS) or is_declared_leaf(child, self.leaf_classes):
                self.open_module(child)
                continue
            try:
                traced = trace(child, self.leaf_classes, auto_leaf=self.auto_leaf)
            except GraphError:
                self.open_module(child)
                continue
            _keep_plain_attributes(child, traced)
            setattr(module, name, traced)
            self.open_graph(traced)


def trace_leaf_interiors(
    gm: fx.GraphModule, leaf_classes: Iterable[str] = (), *, auto_leaf: bool = True
) -> fx.GraphModule:
    """Trace what can be traced inside the leaves of ``gm`` (in place); see the module docstring.

    Example:
        >>> gm = trace_leaf_interiors(trace(timm.create_model("mobilevit_xxs")))
    """
    _Opener(leaf_classes, auto_leaf).open_graph(gm)
    return gm


def graph_modules(root: fx.GraphModule) -> Iterator[tuple[str, fx.GraphModule]]:
    """``root`` and every GraphModule nested in it, with its qualified name, outermost first."""
    yield "", root
    for name, module in root.named_modules():
        if name and isinstance(module, fx.GraphModule):
            yield name, module


def eager_layers(gm: fx.GraphModule) -> list[str]:
    """Qualified names (relative to ``gm``) of the layers run by leaf code, not by a graph node.

    Nested GraphModules are not entered: their layers are graph nodes of their own graph.
    """
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}"
            if isinstance(child, fx.GraphModule):
                continue
            if is_layer(child):
                found.append(path)
            else:
                walk(child, path)

    for target in dict.fromkeys(t for t in called):
        module = gm.get_submodule(target)
        if not is_layer(module) and not isinstance(module, fx.GraphModule):
            walk(module, target)
    return found


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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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
                yield Annotation(_join(prefix, quant.module_name), quant, gm, prefix, node)
            elif node.op == "call_module":
                module = gm.get_submodule(node.target)
                if not isinstance(module, FakeQuantizer):
                    yield from in_leaf(gm, module, str(node.target), prefix, eager)

    def in_leaf(gm: fx.GraphModule, module: nn.Module, local: str, prefix: str,
                eager: dict[str, NodeQuant]) -> Iterator[Annotation]:
        if local in eager:
            yield Annotation(_join(prefix, local), eager[local], gm, prefix, None)
            return
        for child_name, child in module.named_children():
            path = f"{local}.{child_name}"
            if isinstance(child, fx.GraphModule):
                yield from in_graph(child, _join(prefix, path))
            else:
                yield from in_leaf(gm, child, path, prefix, eager)

    yield from in_graph(root, "")
