"""Lowerings of operators that move data around: reshapes, slices, padding, concatenation,
transposes and reductions.

Reshapes take their target from the shapes recorded at two batch sizes: fixed dimensions become
constants and the single dimension that follows the batch becomes -1, so the exported graph
keeps a dynamic batch without tracing how ``x.size(0)`` flows into ``view``.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.errors import ExportError
from mecqtk.export.lower import Lowering, function_handler, method_handler, module_handler
from mecqtk.export.qparams import QuantParams
from mecqtk.graph.ops import selects_values

_INT64_MAX = np.iinfo(np.int64).max
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def _reshape(ctx: Lowering, node: fx.Node) -> str:
    target = ctx.values.dynamic_shape(node)
    if sum(d is None for d in target) > 1:
        raise ExportError(f"{node.name}: reshape with several batch-dependent dimensions")
    shape = ctx.builder.constant(np.array([-1 if d is None else d for d in target], np.int64))
    return ctx.builder.node("Reshape", [ctx.tensor(node.args[0], node), shape], node.name)


method_handler("view", "reshape", "flatten", "squeeze", "unsqueeze")(_reshape)
function_handler(torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze)(_reshape)
module_handler(nn.Flatten, nn.Unflatten)(lambda ctx, node, _m: _reshape(ctx, node))


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@function_handler(operator.getitem)
def _getitem(ctx: Lowering, node: fx.Node) -> str:
    """Tensor indexing with slices, integers and Ellipsis: Slice, then Gather for integers."""
    source_node, index = node.args
    assert isinstance(source_node, fx.Node)
    rank = ctx.rank(source_node)
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1 or any(i is None for i in items):
        raise ExportError(f"{node.name}: indexing with None or several '...' is not exported")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - len(items) + 1)
    starts, ends, axes, steps, gathers = [], [], [], [], []
    for axis, item in enumerate(items):
        item = ctx.static(item, node) if isinstance(item, fx.Node) else item
        if isinstance(item, int):
            gathers.append((axis, item))
        elif isinstance(item, slice):
            if item == slice(None):
                continue
            step = 1 if item.step is None else int(ctx.static(item.step, node))
            if step <= 0:
                raise ExportError(f"{node.name}: slice steps must be positive")
            start = 0 if item.start is None else int(ctx.static(item.start, node))
            end = _INT64_MAX if item.stop is None else int(ctx.static(item.stop, node))
            starts.append(start)
            ends.append(end)
            axes.append(axis)
            steps.append(step)
        else:
            raise ExportError(f"{node.name}: tensor indexing by {type(item).__name__}")
    b = ctx.builder
    result = ctx.tensor(source_node, node)
    if axes:
        const = [b.constant(np.array(v, np.int64)) for v in (starts, ends, axes, steps)]
        name = node.name if not gathers else f"{node.name}_slice"
        result = b.node("Slice", [result, *const], name)
    for removed, (axis, position) in enumerate(gathers):
        last = removed == len(gathers) - 1
        result = b.node("Gather", [result, b.constant(np.array(position, np.int64))],
                        node.name if last else f"{node.name}_gather", axis=axis - removed)
    return result


@function_handler(F.pad)
def _pad(ctx: Lowering, node: fx.Node) -> str:
    source_node = node.args[0]
    assert isinstance(source_node, fx.Node)
    rank = ctx.rank(source_node)
    pad = [int(p) for p in ctx.static(node.args[1] if len(node.args) > 1 else node.kwargs["pad"],
                                      node)]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode not in _PAD_MODES:
        raise ExportError(f"{node.name}: pad mode {mode!r} is not exported")
    begins, ends = [0] * rank, [0] * rank
    for pair in range(len(pad) // 2):  # torch lists (begin, end) from the last dimension back
        begins[rank - 1 - pair] = pad[2 * pair]
        ends[rank - 1 - pair] = pad[2 * pair + 1]
    b = ctx.builder
    inputs = [ctx.tensor(source_node, node), b.constant(np.array(begins + ends, np.int64))]
    grid = _grid_of_selected(ctx, node) if selects_values(node, ctx.modules) else None
    if grid is None:
        if mode == "constant":
            inputs.append(b.constant(np.float32(0.0 if value is None else value)))
        return b.node("Pad", inputs, node.name, mode=_PAD_MODES[mode])
    # zero padding of a quantized value (an option-A shortcut) stays on its grid: pad its
    # integer codes with the zero point instead (exact), so that onnxruntime runs the pad and
    # the Add after it on integers (it drops the DequantizeLinear -> QuantizeLinear pair)
    scale = b.initializer(f"{node.name}_scale", grid.scale)
    zero_point = b.initializer(f"{node.name}_zero_point", grid.storage_zero_point)
    codes = b.node("QuantizeLinear", [inputs[0], scale, zero_point], f"{node.name}_codes")
    padded = b.node("Pad", [codes, inputs[1], zero_point], f"{node.name}_padded_codes",
                    mode="constant")
    output = b.node("DequantizeLinear", [padded, scale, zero_point], node.name,
                    doc="zero-padded value on its input's grid")
    ctx.quantized[output] = grid
    return output


def _grid_of_selected(ctx: Lowering, node: fx.Node) -> QuantParams | None:
    """The per-tensor grid of the quantized value that ``node`` reaches through identity and
    slicing nodes (see :func:`mecqtk.graph.ops.selects_values`), if any."""
    source = node.args[0]
    while isinstance(source, fx.Node):
        name = ctx.env.get(source.name)
        grid = ctx.quantized.get(name) if isinstance(name, str) else None
        if grid is not None:
            return grid if grid.axis is None else None
        if not selects_values(source, ctx.modules):
            return None
        source = source.args[0]
    return None


@function_handler(torch.cat, torch.concat)
def _cat(ctx: Lowering, node: fx.Node) -> str:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    assert isinstance(tensors, list | tuple)
    rank = ctx.rank(tensors[0])  # type: ignore[arg-type]
    return ctx.builder.node("Concat", [ctx.tensor(t, node) for t in tensors], node.name,
                            axis=_axis(int(dim), rank))


def _mean(ctx: Lowering, node: fx.Node) -> str:
    source_node = node.args[0]
    assert isinstance(source_node, fx.Node)
    rank = ctx.rank(source_node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    dims = list(range(rank)) if dim is None else (
        [dim] if isinstance(dim, int) else list(ctx.static(dim, node)))
    axes = [_axis(int(d), rank) for d in dims]
    b = ctx.builder
    source = ctx.tensor(source_node, node)
    if ctx.opset >= 18:
        return b.node("ReduceMean", [source, b.constant(np.array(axes, np.int64))], node.name,
                      keepdims=int(keepdim))
    return b.node("ReduceMean", [source], node.name, axes=axes, keepdims=int(keepdim))


method_handler("mean")(_mean)
function_handler(torch.mean)(_mean)


def _permute(ctx: Lowering, node: fx.Node) -> str:
    source_node = node.args[0]
    assert isinstance(source_node, fx.Node)
    rank = ctx.rank(source_node)
    dims = node.args[1:] if len(node.args) > 2 else node.args[1]
    perm = [_axis(int(d), rank) for d in ctx.static(list(dims), node)]  # type: ignore[arg-type]
    return ctx.builder.node("Transpose", [ctx.tensor(source_node, node)], node.name, perm=perm)


def _transpose(ctx: Lowering, node: fx.Node) -> str:
    source_node = node.args[0]
    assert isinstance(source_node, fx.Node)
    rank = ctx.rank(source_node)
    a, c = (_axis(int(ctx.static(d, node)), rank) for d in node.args[1:3])
    perm = list(range(rank))
    perm[a], perm[c] = perm[c], perm[a]
    return ctx.builder.node("Transpose", [ctx.tensor(source_node, node)], node.name, perm=perm)


method_handler("permute")(_permute)
function_handler(torch.permute)(_permute)
method_handler("transpose")(_transpose)
function_handler(torch.transpose)(_transpose)
