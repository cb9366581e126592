"""A torch.fx tracer that knows timm: its not-traceable modules and functions are leaves."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch import nn

from mecqtk.errors import GraphError
from mecqtk.quant.modules import QuantizedLayer, is_quantizable_layer


class QuantTracer(fx.Tracer):
    """Traces through everything except timm's not-traceable modules, quantizable layers (so the
    insert pass can swap them), and any extra leaf classes named by the caller."""

    def __init__(self, extra_leaf_classes: Iterable[str] = ()) -> None:
        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self.timm_leaves = tuple(timm_fx.get_notrace_modules())
        self.extra_leaf_classes = frozenset(extra_leaf_classes)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_quantizable_layer(m) or isinstance(m, QuantizedLayer):
            return True
        if isinstance(m, self.timm_leaves) or type(m).__name__ in self.extra_leaf_classes:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the innermost module records itself first; outer ones keep that record
            if getattr(self, "failed_module", None) is None:
                self.failed_module = self.path_of_module(m)
            raise


def trace(model: nn.Module, extra_leaf_classes: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule whose submodules keep their names.

    Example:
        >>> import timm
        >>> gm = trace(timm.create_model("resnet18"))
    """
    tracer = QuantTracer(extra_leaf_classes)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # any failure inside user/timm code: report where it happened
        where = _innermost_module(tracer, model)
        raise GraphError(
            f"cannot trace {type(model).__name__}{where}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _innermost_module(tracer: QuantTracer, model: nn.Module) -> str:
    """' in module <path> (<Class>)' for the module being traced when tracing failed, if known."""
    path = getattr(tracer, "failed_module", None)
    if not path:
        return ""
    cls = type(model.get_submodule(path)).__name__
    return f" in module {path} ({cls}); add {cls} to the recipe key quant.leaf_modules to keep it whole"
