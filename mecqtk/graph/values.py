"""Which graph values are tensors, as opposed to sizes, shapes and other Python values.

A symbolic trace has no types: ``x.shape[1] + 1`` and ``x + y`` are both ``operator.add``. The
annotate pass may only put a quantizer on a tensor, so it asks this analysis first. The analysis is
conservative where it cannot know: a value of unknown kind is never quantized.
"""

from __future__ import annotations

import functools
import operator
from enum import Enum

import torch
import torch.fx as fx
from torch import nn


class ValueKind(Enum):
    TENSOR = "tensor"
    SEQUENCE = "sequence"  # a tuple/list of tensors (torch.split, a module returning a tuple)
    OTHER = "other"  # a Python value (size, shape, dtype) or something we cannot tell


_NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_SEQUENCE_FUNCTIONS = {
    torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.meshgrid,
    torch.broadcast_tensors,
}
_SEQUENCE_METHODS = {"split", "chunk", "unbind", "tensor_split"}
_NON_TENSOR_METHODS = {
    "size", "dim", "numel", "item", "tolist", "stride", "nelement", "element_size",
    "is_contiguous", "get_device", "data_ptr", "__len__", "type",
}
# Modules from torch.nn that return a tuple.
_SEQUENCE_MODULES = (nn.MultiheadAttention, nn.RNNBase)
_PYTHON_TYPES = (int, float, tuple, list, torch.Size)


@functools.cache
def _torch_callables() -> frozenset[int]:
    """Ids of the functions in torch's public namespaces (builtins there have no __module__)."""
    spaces = (torch, torch.nn.functional, torch.special, torch.linalg, torch.fft)
    return frozenset(id(v) for space in spaces for v in vars(space).values() if callable(v))


def _is_tensor_method(name: str) -> bool:
    """A method only tensors have (``view``, ``permute``), as opposed to ``size`` or ``__add__``."""
    return hasattr(torch.Tensor, name) and not any(hasattr(t, name) for t in _PYTHON_TYPES)


def _kind_of_module_output(node: fx.Node, module: nn.Module) -> ValueKind:
    if isinstance(module, _SEQUENCE_MODULES):
        return ValueKind.SEQUENCE
    users = list(node.users)
    if users and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
        for u in users
    ):
        return ValueKind.SEQUENCE  # only ever unpacked: a tuple-returning module
    return ValueKind.TENSOR


def _kind_of_function(node: fx.Node, kinds: dict[fx.Node, ValueKind]) -> ValueKind:
    target = node.target
    inputs = [kinds.get(i, ValueKind.OTHER) for i in node.all_input_nodes]
    if target is operator.getitem:
        source = kinds.get(node.args[0], ValueKind.OTHER) if node.args else ValueKind.OTHER
        return ValueKind.TENSOR if source is not ValueKind.OTHER else ValueKind.OTHER
    if target is getattr:
        source = kinds.get(node.args[0], ValueKind.OTHER)
        if node.args[1] in _NON_TENSOR_ATTRS or source is not ValueKind.TENSOR:
            return ValueKind.OTHER
        return ValueKind.TENSOR
    if target in _SEQUENCE_FUNCTIONS:
        return ValueKind.SEQUENCE
    if getattr(target, "__module__", None) == "_operator":
        return ValueKind.TENSOR if ValueKind.TENSOR in inputs else ValueKind.OTHER
    module = getattr(target, "__module__", None) or ""
    if module.startswith("torch") or id(target) in _torch_callables():
        return ValueKind.TENSOR
    return ValueKind.OTHER  # builtins (len, int), math, and functions kept whole by the tracer


def _kind_of_method(node: fx.Node, kinds: dict[fx.Node, ValueKind]) -> ValueKind:
    name = str(node.target)
    if name in _NON_TENSOR_METHODS:
        return ValueKind.OTHER
    if name in _SEQUENCE_METHODS:
        return ValueKind.SEQUENCE
    receiver = kinds.get(node.args[0], ValueKind.OTHER) if node.args else ValueKind.OTHER
    if hasattr(torch.Tensor, name) and (receiver is ValueKind.TENSOR or _is_tensor_method(name)):
        return ValueKind.TENSOR
    return ValueKind.OTHER


def value_kinds(gm: fx.GraphModule) -> dict[fx.Node, ValueKind]:
    """The kind of every node's output. Graph inputs are taken to be tensors unless their default
    is a Python value (``mask=None``)."""
    modules = dict(gm.named_modules())
    kinds: dict[fx.Node, ValueKind] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            has_value_default = bool(node.args) and not isinstance(node.args[0], torch.Tensor)
            kinds[node] = ValueKind.OTHER if has_value_default else ValueKind.TENSOR
        elif node.op == "get_attr":
            kinds[node] = ValueKind.TENSOR
        elif node.op == "call_module":
            kinds[node] = _kind_of_module_output(node, modules[node.target])
        elif node.op == "call_function":
            kinds[node] = _kind_of_function(node, kinds)
        elif node.op == "call_method":
            kinds[node] = _kind_of_method(node, kinds)
        else:
            kinds[node] = ValueKind.OTHER
    return kinds


def tensor_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    return {n for n, k in value_kinds(gm).items() if k is ValueKind.TENSOR}
