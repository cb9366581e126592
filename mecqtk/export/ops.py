"""Lowerings of the float operators around the quantized layers: activations, pooling,
arithmetic. Shape-changing operators live in :mod:`mecqtk.export.shape_ops`."""

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


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _alias(ctx: Lowering, node: fx.Node) -> str:
    return ctx.tensor(node.args[0], node)


# ---- activations ----------------------------------------------------------------------
def _unary(op_type: str, **attributes: object):
    def lower(ctx: Lowering, node: fx.Node, *_: object) -> str:
        return ctx.builder.node(op_type, [ctx.tensor(node.args[0], node)], node.name, **attributes)

    return lower


module_handler(nn.ReLU)(_unary("Relu"))
function_handler(F.relu, torch.relu)(_unary("Relu"))
method_handler("relu")(_unary("Relu"))
module_handler(nn.Sigmoid)(_unary("Sigmoid"))
function_handler(torch.sigmoid, F.sigmoid)(_unary("Sigmoid"))
method_handler("sigmoid")(_unary("Sigmoid"))
module_handler(nn.Tanh)(_unary("Tanh"))
function_handler(torch.tanh, F.tanh)(_unary("Tanh"))
module_handler(nn.Hardsigmoid)(_unary("HardSigmoid", alpha=1.0 / 6.0, beta=0.5))
function_handler(F.hardsigmoid)(_unary("HardSigmoid", alpha=1.0 / 6.0, beta=0.5))
module_handler(nn.Hardswish)(_unary("HardSwish"))
function_handler(F.hardswish)(_unary("HardSwish"))
module_handler(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)(
    lambda ctx, node, _m: _alias(ctx, node)
)
function_handler(F.dropout)(_alias)
method_handler("contiguous", "clone", "detach")(_alias)


def _relu6(ctx: Lowering, node: fx.Node, *_: object) -> str:
    b = ctx.builder
    return b.node("Clip", [ctx.tensor(node.args[0], node), b.constant(np.float32(0.0)),
                           b.constant(np.float32(6.0))], node.name)


module_handler(nn.ReLU6)(_relu6)
function_handler(F.relu6)(_relu6)


def _silu(ctx: Lowering, node: fx.Node, *_: object) -> str:
    source = ctx.tensor(node.args[0], node)
    gate = ctx.builder.node("Sigmoid", [source], f"{node.name}_gate")
    return ctx.builder.node("Mul", [source, gate], node.name)


module_handler(nn.SiLU)(_silu)
function_handler(F.silu)(_silu)


@module_handler(nn.LeakyReLU)
def _leaky_relu(ctx: Lowering, node: fx.Node, module: nn.Module) -> str:
    return ctx.builder.node("LeakyRelu", [ctx.tensor(node.args[0], node)], node.name,
                            alpha=float(module.negative_slope))


def _gelu(ctx: Lowering, node: fx.Node, approximate: str) -> str:
    ctx.need_opset(20, f"{node.name}: Gelu")
    return ctx.builder.node("Gelu", [ctx.tensor(node.args[0], node)], node.name,
                            approximate=approximate)


module_handler(nn.GELU)(lambda ctx, node, m: _gelu(ctx, node, m.approximate))
function_handler(F.gelu)(lambda ctx, node: _gelu(ctx, node, node.kwargs.get("approximate", "none")))


@module_handler(nn.Softmax)
def _softmax(ctx: Lowering, node: fx.Node, module: nn.Module) -> str:
    axis = module.dim if module.dim is not None else -1
    return ctx.builder.node("Softmax", [ctx.tensor(node.args[0], node)], node.name, axis=axis)


# ---- arithmetic -----------------------------------------------------------------------
def _binary(op_type: str):
    def lower(ctx: Lowering, node: fx.Node) -> str:
        if node.kwargs.get("alpha", 1) != 1:
            raise ExportError(f"{node.name}: add/sub with alpha is not exported")
        left = ctx.tensor(node.args[0], node)
        right = ctx.tensor(_arg(node, 1, "other"), node)
        return ctx.builder.node(op_type, [left, right], node.name)

    return lower


function_handler(operator.add, operator.iadd, torch.add)(_binary("Add"))
method_handler("add", "add_")(_binary("Add"))
function_handler(operator.sub, operator.isub, torch.sub)(_binary("Sub"))
function_handler(operator.mul, operator.imul, torch.mul)(_binary("Mul"))
method_handler("mul", "mul_")(_binary("Mul"))
function_handler(operator.truediv, torch.div)(_binary("Div"))


# ---- pooling ----------------------------------------------------------------------------
def _pair(value: object, dims: int) -> list[int]:
    if isinstance(value, int):
        return [value] * dims
    return [int(v) for v in value]  # type: ignore[union-attr]


def _pool(ctx: Lowering, node: fx.Node, op_type: str, kernel: object, stride: object,
          padding: object, ceil_mode: bool, extra: dict[str, object]) -> str:
    dims = ctx.rank(node.args[0]) - 2  # type: ignore[arg-type]
    kernel_shape = _pair(kernel, dims)
    strides = _pair(stride if stride not in (None, []) else kernel, dims)
    pads = _pair(padding, dims) * 2
    source = ctx.tensor(node.args[0], node)
    grid = ctx.quantized.get(source) if op_type == "MaxPool" else None
    if grid is not None and grid.axis is not None:
        grid = None  # a per-channel grid: left as it is
    name = node.name if grid is None else f"{node.name}_pooled"
    pooled = ctx.builder.node(op_type, [source], name, kernel_shape=kernel_shape,
                              strides=strides, pads=pads, ceil_mode=int(bool(ceil_mode)), **extra)
    return pooled if grid is None else _regrid(ctx, node, pooled, grid)


def _regrid(ctx: Lowering, node: fx.Node, pooled: str, grid: QuantParams,
            doc: str = "max-pool output on its input's grid") -> str:
    """Max-pooling a quantized tensor picks values already on its grid: re-quantizing with the
    input's own scale and zero point is exact, and it lets onnxruntime run the pool on the
    integer codes (it drops a DequantizeLinear -> MaxPool -> QuantizeLinear with equal
    parameters) instead of dequantizing the largest activation of the network to float."""
    b = ctx.builder
    scale = b.initializer(f"{node.name}_scale", grid.scale)
    zero_point = b.initializer(f"{node.name}_zero_point", grid.storage_zero_point)
    codes = b.node("QuantizeLinear", [pooled, scale, zero_point], f"{node.name}_codes")
    output = b.node("DequantizeLinear", [codes, scale, zero_point], node.name,
                    doc=doc)
    ctx.quantized[output] = grid
    return output


@module_handler(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool_module(ctx: Lowering, node: fx.Node, m: nn.Module) -> str:
    if m.return_indices:
        raise ExportError(f"{node.name}: max pooling with indices is not exported")
    dims = ctx.rank(node.args[0]) - 2  # type: ignore[arg-type]
    return _pool(ctx, node, "MaxPool", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 {"dilations": _pair(m.dilation, dims)})


@function_handler(F.max_pool2d)
def _max_pool_function(ctx: Lowering, node: fx.Node) -> str:
    kernel = _arg(node, 1, "kernel_size")
    dims = ctx.rank(node.args[0]) - 2  # type: ignore[arg-type]
    return _pool(ctx, node, "MaxPool", kernel, _arg(node, 2, "stride"), _arg(node, 3, "padding", 0),
                 bool(_arg(node, 5, "ceil_mode", False)),
                 {"dilations": _pair(_arg(node, 4, "dilation", 1), dims)})


def _avg_extra(node: fx.Node, count_include_pad: bool, divisor: object) -> dict[str, object]:
    if divisor is not None:
        raise ExportError(f"{node.name}: avg_pool with divisor_override is not exported")
    return {"count_include_pad": int(bool(count_include_pad))}


@module_handler(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(ctx: Lowering, node: fx.Node, m: nn.Module) -> str:
    divisor = getattr(m, "divisor_override", None)
    return _pool(ctx, node, "AveragePool", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 _avg_extra(node, m.count_include_pad, divisor))


@function_handler(F.avg_pool2d)
def _avg_pool_function(ctx: Lowering, node: fx.Node) -> str:
    return _pool(ctx, node, "AveragePool", _arg(node, 1, "kernel_size"), _arg(node, 2, "stride"),
                 _arg(node, 3, "padding", 0), bool(_arg(node, 4, "ceil_mode", False)),
                 _avg_extra(node, _arg(node, 5, "count_include_pad", True),
                            _arg(node, 6, "divisor_override")))


def _adaptive(ctx: Lowering, node: fx.Node, output_size: object, average: bool) -> str:
    source_node = node.args[0]
    assert isinstance(source_node, fx.Node)
    spatial = ctx.values.shape(source_node)[2:]
    sizes = [output_size] * len(spatial) if isinstance(output_size, int) else list(output_size)
    wanted = [s if o is None else o for s, o in zip(spatial, sizes, strict=True)]
    source = ctx.tensor(source_node, node)
    if all(o == 1 for o in wanted):
        op_type = "GlobalAveragePool" if average else "GlobalMaxPool"
        return ctx.builder.node(op_type, [source], node.name)
    if any(s % o for s, o in zip(spatial, wanted, strict=True)):
        raise ExportError(
            f"{node.name}: adaptive pooling from {tuple(spatial)} to {tuple(wanted)} has uneven "
            "windows and is not exported"
        )
    kernel = [s // o for s, o in zip(spatial, wanted, strict=True)]
    op_type = "AveragePool" if average else "MaxPool"
    return ctx.builder.node(op_type, [source], node.name, kernel_shape=kernel, strides=kernel)


module_handler(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)(
    lambda ctx, node, m: _adaptive(ctx, node, m.output_size, average=True)
)
module_handler(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)(
    lambda ctx, node, m: _adaptive(ctx, node, m.output_size, average=False)
)
function_handler(F.adaptive_avg_pool2d, F.adaptive_avg_pool1d)(
    lambda ctx, node: _adaptive(ctx, node, ctx.static(_arg(node, 1, "output_size"), node), True)
)
function_handler(F.adaptive_max_pool2d)(
    lambda ctx, node: _adaptive(ctx, node, ctx.static(_arg(node, 1, "output_size"), node), False)
)
