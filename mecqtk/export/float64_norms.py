"""Normalisations that the model in eval mode and its ONNX file compute alike: in float64.

A LayerNorm (or GroupNorm, RMSNorm) sums a whole row in float32, and PyTorch and onnxruntime
sum in different orders: on 1.2 M values of a random LayerNorm, 19 % of onnxruntime's outputs
differed from PyTorch's in the last bit. A 4-bit quantizer after the norm turns such a bit, at a
half code, into a different code, and a barely trained swin_tiny agreed with its own file on only
98.8 % of top-1 decisions (the first diverging tensor: the quantizer after the patch embedding's
LayerNorm).

Computed in float64 and rounded once to float32, the two agree on all but about one value in a
million (measured, the same LayerNorm: 8e-7). So in eval mode, and in the ``torch.export`` trace
the file is written from, each normalisation between quantizers runs on float64 copies of its
input and parameters (the file holds ``Cast -> LayerNormalization(double) -> Cast``). Training
computes the float32 norm as before; the two differ by float32 rounding only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import RmsNorm, RmsNorm2d
from torch import nn

from mecqtk.graph.introspect import graph_modules

Tensor = torch.Tensor

# modules whose forward is a normalisation and nothing after it (a timm norm-act layer also
# applies its activation: its act must be the identity)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, RmsNorm, RmsNorm2d)
NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.rms_norm, torch.layer_norm, torch.group_norm}


def is_plain_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes a normalisation (with its affine) and nothing else."""
    act = getattr(module, "act", None)
    return isinstance(module, NORM_MODULES) and (act is None or isinstance(act, nn.Identity))


def _wide(value: Any) -> Any:
    return value.double() if isinstance(value, Tensor) and value.is_floating_point() else value


class NormInFloat64(nn.Module):
    """A normalisation that computes in float64 in eval mode and in float32 in training.

    Holds its module or function by reference: the module stays where the model registered it,
    so the state dict, ``.to()`` and checkpoints see no change.
    """

    def __init__(self, norm: nn.Module | Callable[..., Tensor]) -> None:
        super().__init__()
        self._norm = (norm,)  # a tuple: not registered as a submodule

    @property
    def norm(self) -> nn.Module | Callable[..., Tensor]:
        return self._norm[0]

    def extra_repr(self) -> str:
        norm = self.norm
        return type(norm).__name__ if isinstance(norm, nn.Module) else getattr(norm, "__name__", "")

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        norm = self.norm
        if self.training:
            return norm(*args, **kwargs)
        dtype = args[0].dtype
        wide_args = tuple(_wide(a) for a in args)
        wide_kwargs = {k: _wide(v) for k, v in kwargs.items()}
        if isinstance(norm, nn.Module):
            state = {name: _wide(t) for name, t in (*norm.named_parameters(),
                                                    *norm.named_buffers())}
            out = torch.func.functional_call(norm, state, wide_args, wide_kwargs)
        else:
            out = norm(*wide_args, **wide_kwargs)
        return out.to(dtype)


def _norm_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | Callable | None:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return module if module is not None and is_plain_norm(module) else None
    if node.op == "call_function" and node.target in NORM_FUNCTIONS:
        return node.target
    return None


def norms_in_float64(model: fx.GraphModule) -> int:
    """Put a :class:`NormInFloat64` in place of every normalisation of ``model``'s graphs;
    returns how many.

    Example:
        >>> norms_in_float64(qmodel)  # done by mecqtk.prepare, with the other eval forms
        29
    """
    replaced = 0
    for _, graph_module in graph_modules(model):
        modules = dict(graph_module.named_modules())
        changed = False
        for node in list(graph_module.graph.nodes):
            norm = _norm_of(node, modules)
            if norm is None:
                continue
            name = f"float64_{node.name}"
            graph_module.add_submodule(name, NormInFloat64(norm))
            with graph_module.graph.inserting_before(node):
                new = graph_module.graph.call_module(name, node.args, node.kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph_module.graph.erase_node(node)
            replaced += 1
            changed = True
        if changed:
            graph_module.recompile()
    return replaced
