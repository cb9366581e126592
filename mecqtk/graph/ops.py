"""What a graph node computes, as far as quantization cares, and where its tensor operands sit.

Both passes use :func:`node_arguments` / :func:`replace_node_argument`, so the annotate pass's
``NodeQuant.inputs[i]`` and the insert pass's rewiring always mean the same operand.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.graph.meta import OpKind
from mecqtk.quant.modules import layer_kind

LAYER_KINDS = ("conv", "linear")
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
POOL_MODULES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
}
# Modules that hand their input on unchanged once the model is in eval mode: a quantized value
# stays on its grid through them.
ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
# Max pools the exporter lowers to MaxPool: their output lies on their input's integer grid.
GRID_PRESERVING_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
GRID_PRESERVING_POOL_FUNCTIONS = {F.max_pool2d}
FUNCTIONAL_LAYERS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
_SPATIAL_DIMS = ({2, 3}, {-2, -1}, {2, 3, 4}, {-3, -2, -1})


def node_arguments(node: fx.Node) -> list[fx.Node]:
    """The node's graph-value arguments in order: ``args`` then ``kwargs``, lists flattened.

    ``add(a, b)`` -> ``[a, b]``; ``cat([a, b, c], 1)`` -> ``[a, b, c]``; a conv call -> ``[x]``.
    """
    found: list[fx.Node] = []

    def visit(value: Any) -> None:
        if isinstance(value, fx.Node):
            found.append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    for value in (*node.args, *node.kwargs.values()):
        visit(value)
    return found


def replace_node_argument(node: fx.Node, index: int, new: fx.Node) -> None:
    """Replace the ``index``-th entry of :func:`node_arguments` (and only that occurrence)."""
    counter = iter(range(1 << 30))

    def rewrite(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return new if next(counter) == index else value
        if isinstance(value, list | tuple):
            return type(value)(rewrite(item) for item in value)
        return value

    args = tuple(rewrite(a) for a in node.args)
    kwargs = {k: rewrite(v) for k, v in node.kwargs.items()}
    node.args, node.kwargs = args, kwargs


def _is_global_mean(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return isinstance(dims, list | tuple) and set(dims) in _SPATIAL_DIMS


def image_mean_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of ``x.mean((2, 3), keepdim=True)`` (or ``torch.mean``) over the two spatial
    axes of an image, keeping them (a squeeze-excitation squeeze); None for any other node."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)
    if not is_mean or not _is_global_mean(node):
        return None
    dims = tuple(int(d) for d in _argument(node, 1, "dim"))
    keepdim = _argument(node, 2, "keepdim")
    return dims if keepdim is True and set(dims) in ({2, 3}, {-2, -1}) else None


def _argument(node: fx.Node, position: int, keyword: str) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword)


def functional_weight(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, int] | None:
    """For ``F.linear(x, self.qkv.weight, bias)`` and ``F.conv2d`` likewise: the name of the
    layer whose weight parameter is passed, and the weight's index in :func:`node_arguments`.
    None when the weight is computed rather than a module's own ``weight`` parameter.

    (A traced GraphModule keeps only the parameter of a layer used this way, not the layer's
    class, so the parameter's rank tells linear (2) from conv (3 to 5).)
    """
    if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS:
        return None
    weight = _argument(node, 1, "weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    owner, _, attr = str(weight.target).rpartition(".")
    parent = modules.get(owner)
    parameter = getattr(parent, attr, None) if parent is not None else None
    if attr != "weight" or not isinstance(parameter, nn.Parameter):
        return None
    rank_ok = parameter.dim() == 2 if FUNCTIONAL_LAYERS[node.target] == "linear" else (
        parameter.dim() == {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}[node.target])
    return (owner, node_arguments(node).index(weight)) if rank_ok else None


def layer_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The layer a conv/linear node computes: its module, or the owner of its weight."""
    functional = functional_weight(node, modules)
    return functional[0] if functional else str(node.target)


def preserves_grid(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` only picks values of its input (a max pool): a quantized input then
    leaves its output on the same grid, so requantizing it on an equal grid is a no-op."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        return isinstance(module, GRID_PRESERVING_POOL_MODULES) and not module.return_indices
    return node.op == "call_function" and node.target in GRID_PRESERVING_POOL_FUNCTIONS and not (
        node.kwargs.get("return_indices") or (len(node.args) > 6 and node.args[6])
    )


# Ops that only move values (same values, another layout). onnxruntime moves a QuantizeLinear
# back over them (its QDQ propagation: Reshape, Transpose, Squeeze, Unsqueeze), so a layer whose
# output reaches a quantizer only through these still runs on an integer kernel.
REARRANGING_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous",
                       "squeeze", "unsqueeze"}
REARRANGING_FUNCTIONS = {torch.reshape, torch.flatten, torch.permute, torch.transpose,
                         torch.squeeze, torch.unsqueeze}


def rearranges_values(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` passes its first argument's values on in another layout (a reshape,
    flatten, transpose, ...) or unchanged (an alias module in eval: Identity, Dropout)."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], ALIAS_MODULES)
    if node.op == "call_method":
        return node.target in REARRANGING_METHODS
    return node.op == "call_function" and node.target in REARRANGING_FUNCTIONS


def selects_values(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` only passes on, picks or zero-pads values of its first argument:
    ``nn.Identity``, basic indexing (``x[:, :, ::2, ::2]``) and constant zero padding, as in the
    parameter-free "option A" ResNet shortcut. A quantized input leaves the output on the same
    grid (zero lies on every grid). Whether the argument is a tensor is the caller's check."""
    if node.op == "call_module":
        return type(modules[str(node.target)]) is nn.Identity
    if node.op != "call_function" or not node.args:
        return False
    if node.target is operator.getitem:
        index = node.args[1] if len(node.args) > 1 else None
        entries = index if isinstance(index, tuple) else (index,)
        return all(isinstance(e, slice | int) or e is Ellipsis or e is None for e in entries) and (
            all(isinstance(e.step, int | None) and isinstance(e.start, int | None)
                and isinstance(e.stop, int | None) for e in entries if isinstance(e, slice)))
    if node.target is F.pad:
        mode = _argument(node, 2, "mode") or "constant"
        value = _argument(node, 3, "value")
        return mode == "constant" and (value is None or value == 0)
    return False


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> OpKind | None:
    """The quantization-relevant kind of ``node``, or None for anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        kind = layer_kind(module)
        if kind is not None:
            return kind
        if isinstance(module, POOL_MODULES):
            return "pool"
        return None
    if node.op == "call_function":
        target = node.target
        if target in FUNCTIONAL_LAYERS:
            return FUNCTIONAL_LAYERS[target] if functional_weight(node, modules) else None
        if target in ADD_FUNCTIONS:
            return "add"
        if target in CAT_FUNCTIONS:
            return "cat"
        if target in MATMUL_FUNCTIONS:
            return "matmul"
        if target in POOL_FUNCTIONS or (target is torch.mean and _is_global_mean(node)):
            return "pool"
        return None
    if node.op == "call_method":
        if node.target in ADD_METHODS:
            return "add"
        if node.target in MATMUL_METHODS:
            return "matmul"
        if node.target == "mean" and _is_global_mean(node):
            return "pool"
    return None


def operand_nodes(node: fx.Node, kind: OpKind) -> list[int]:
    """Indices into :func:`node_arguments` of the tensors a node of ``kind`` combines: the data
    input of a layer or pool, both sides of an add or matmul, every piece of a cat."""
    arguments = node_arguments(node)
    if kind in ("conv", "linear", "pool"):
        data = _argument(node, 0, "input")
        return [arguments.index(data)] if isinstance(data, fx.Node) else []
    if kind == "cat":
        pieces = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return list(range(len([p for p in pieces if isinstance(p, fx.Node)])))
    # add / matmul: the first two positional operands (alpha= and out= are not operands)
    operands = [a for a in node.args[:2]]
    if len(operands) < 2 and "other" in node.kwargs:
        operands.append(node.kwargs["other"])
    if len(operands) == 2 and all(isinstance(o, fx.Node) for o in operands):
        return [arguments.index(operands[0]), _second_index(arguments, operands)]
    return []


def _second_index(arguments: list[fx.Node], operands: list[Any]) -> int:
    """Index of the second operand; ``x + x`` names the same node twice."""
    if operands[0] is operands[1]:
        return arguments.index(operands[1], arguments.index(operands[0]) + 1)
    return arguments.index(operands[1])
