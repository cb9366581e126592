"""A torch.fx tracer that knows timm: its not-traceable modules and functions are leaves.

Leaves (modules called as one opaque node) are, in order of precedence:

- quantizable layers (Conv/Linear) and already quantized ones, so the insert pass can swap them;
- timm's not-traceable modules (``timm.layers._fx`` registry) and classes named by the recipe's
  ``quant.leaf_modules``;
- modules without Conv/Linear whose own ``forward`` reads ``self.training``: tracing runs in one
  mode, so tracing through them would freeze that mode's branch into the graph (a traced
  DropPath would keep dropping in eval). Modules with layers are traced through all the same, to
  keep their layers and matmuls visible (timm's attention reads ``self.training`` only on its
  fused path, which :mod:`mecqtk.graph.attention` turns off);
- torch.nn's own modules (fx's default).

timm's not-traceable functions are kept as single call nodes. A functional dropout whose
``training`` argument was read from ``self.training`` becomes a Dropout module, for the same reason
(timm's ghostnet/efficientnet heads call ``F.dropout(x, p, training=self.training)``: traced as
is, the graph would keep dropping in eval, in the deploy form and in the exported file).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch.fx as fx
import torch.nn.functional as F
from timm.layers import _fx as timm_fx
from torch import nn

from mecqtk.errors import GraphError
from mecqtk.graph.meta import graph_info
from mecqtk.quant.modules import holds_layers, is_layer

MAX_AUTO_LEAVES = 32
# functional dropouts and the module that applies the same dropout only in training mode
_DROPOUT_MODULES: dict[object, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
}


@functools.cache
def _forward_reads_training(cls: type) -> bool:
    forward = next((k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__), None)
    if forward is None or forward is nn.Module.forward:
        return False
    try:
        return "self.training" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def is_declared_leaf(module: nn.Module, extra_leaf_classes: Iterable[str] = ()) -> bool:
    """A leaf by timm's registry, the recipe, or because its forward depends on train/eval."""
    return (
        isinstance(module, tuple(timm_fx.get_notrace_modules()))
        or type(module).__name__ in set(extra_leaf_classes)
        or (_forward_reads_training(type(module))
            and not holds_layers(module))
    )


class QuantTracer(fx.Tracer):
    """Traces through everything except the leaves listed in this module's docstring.

    After a failed ``trace``, ``failed_module`` names the innermost module being traced.
    """

    def __init__(self, extra_leaf_classes: Iterable[str] = ()) -> None:
        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self.extra_leaf_classes = frozenset(extra_leaf_classes)
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_layer(m):
            return True
        if is_declared_leaf(m, self.extra_leaf_classes):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the innermost module records itself first; outer ones keep that record
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _failure(model: nn.Module, tracer: QuantTracer, err: Exception) -> tuple[str | None, str]:
    """(class name of the failing submodule or None, a one-line message that says what to do)."""
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    path = tracer.failed_module
    if not path:
        return None, (f"cannot trace {type(model).__name__}: its own forward is not traceable "
                      f"({reason})")
    cls = type(model.get_submodule(path)).__name__
    return cls, (
        f"cannot trace {type(model).__name__} in module {path} ({cls}): {reason}; add {cls} to "
        f"the recipe key quant.leaf_modules to keep it whole (its Conv/Linear are still quantized)"
    )


def _defaults_after_input(model: nn.Module) -> dict[str, object]:
    """Optional forward arguments after the input (``mask=None``), to trace with their defaults:
    a model is called as ``model(x)``, and a traced ``if mask is not None`` would otherwise take
    the branch for a mask. fx guards each: passing another value fails loudly."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default for p in parameters
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and isinstance(p.default, bool | int | float | str | type(None))
    }


def trace(
    model: nn.Module,
    extra_leaf_classes: Iterable[str] = (),
    *,
    auto_leaf: bool = False,
    specialize_defaults: bool = False,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule whose submodules keep their names.

    Args:
        model: the module to trace.
        extra_leaf_classes: class names to keep whole (the recipe's ``quant.leaf_modules``).
        auto_leaf: when tracing fails inside a submodule, keep that submodule's class whole and
            try again (the classes added are in ``graph_info(gm).auto_leaves``).
        specialize_defaults: trace optional forward arguments after the input at their default
            values (for a whole model, called as ``model(x)``).

    Raises:
        GraphError: naming the module path and class where tracing failed and the recipe key
            that makes it a leaf.

    Example:
        >>> import timm
        >>> gm = trace(timm.create_model("resnet18"))
    """
    leaves = list(extra_leaf_classes)
    added: list[str] = []
    concrete = _defaults_after_input(model) if specialize_defaults else None
    for _ in range(MAX_AUTO_LEAVES + 1):
        tracer = QuantTracer(leaves)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as err:  # any failure inside user/timm code: report where it happened
            cls, message = _failure(model, tracer, err)
            if not auto_leaf or cls is None or cls in leaves:
                raise GraphError(message) from err
            leaves.append(cls)
            added.append(cls)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        dropouts_follow_mode(gm, traced_training=model.training)
        graph_info(gm).auto_leaves = tuple(added)
        return gm
    raise GraphError(f"cannot trace {type(model).__name__}: more than {MAX_AUTO_LEAVES} module "
                     f"classes fail to trace ({', '.join(added)})")


def dropouts_follow_mode(gm: fx.GraphModule, traced_training: bool) -> int:
    """Replace each functional dropout whose ``training`` argument was traced as the model's mode
    with the equivalent Dropout module (same node name), so it follows ``train()``/``eval()``.

    A dropout traced with the opposite constant (``training=False`` in a model traced in training
    mode) was written that way on purpose and is left alone. Returns how many were replaced.
    """
    replaced = 0
    for node in list(gm.graph.nodes):
        module_class = _DROPOUT_MODULES.get(node.target) if node.op == "call_function" else None
        if module_class is None:
            continue
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        p, training = bound.arguments["p"], bound.arguments["training"]
        if isinstance(p, fx.Node) or isinstance(training, fx.Node):
            continue
        if training != traced_training and traced_training:
            continue
        name = node.name
        while hasattr(gm, name):
            name = f"{name}_mode"
        gm.add_submodule(name, module_class(float(p)))
        # changed in place, so the node keeps its name (and quantizers named after it theirs)
        node.op, node.target = "call_module", name
        node.args, node.kwargs = (bound.arguments["input"],), {}
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced
