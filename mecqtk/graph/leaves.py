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

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from mecqtk.errors import GraphError
from mecqtk.graph.tracer import is_declared_leaf, trace
from mecqtk.quant.modules import holds_layers, is_layer

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PLAIN_ATTRIBUTE_TYPES = (int, float, bool, str, tuple, type(None))


# GraphModule.__deepcopy__ (run by the convert stage) rebuilds the module from its graph and
# keeps only the attributes listed under this key of its ``meta``.
_PRESERVED_KEY = "_user_preserved_attributes"


def _keep_plain_attributes(original: nn.Module, traced: fx.GraphModule) -> None:
    """Leaf code may read ``self.attn.num_heads``: copy such plain attributes to the traced copy,
    and have them survive a deep copy (timm's efficientvit_m0 reads ``self.attn.resolution``)."""
    preserved = traced.meta.setdefault(_PRESERVED_KEY, {})
    for key, value in vars(original).items():
        if key.startswith("_") or key in vars(traced) or key == "training":
            continue
        if isinstance(value, _PLAIN_ATTRIBUTE_TYPES):
            setattr(traced, key, value)
            preserved[key] = value


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
