"""Lowerings of the quantized pieces: activation quantizers (QuantizeLinear -> integer Clip ->
DequantizeLinear) and Conv/Linear layers with integer weights, folded BatchNorm and int32 bias.

Weights are initializers of integer codes followed by a per-channel DequantizeLinear. In the
``qcdq`` format the codes sit in int8; in ``packed`` they are stored as INT4/INT2 and a Cast
widens them to int8 before the DequantizeLinear. onnxruntime folds that Cast away when it loads
the model, so a packed file runs on the same integer kernels as a qcdq one.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from onnx import TensorProto
from torch import nn

from mecqtk.errors import ExportError
from mecqtk.export.lower import Lowering, module_handler
from mecqtk.export.manifest import TensorEntry
from mecqtk.export.qparams import QuantParams, activation_params, weight_codes, weight_params
from mecqtk.export.weights import (
    BATCHNORMS,
    BatchNormFold,
    FoldedLayer,
    code_shift,
    fold_layer,
    foldable_batchnorm,
    layer_terms,
    storage_dtype,
    to_storage,
)
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_STORAGE_OPSET = {"int4": 21, "uint4": 21, "int2": 25, "uint2": 25}
_ONNX_INT = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


@module_handler(FakeQuantizer)
def lower_activation_quantizer(ctx: Lowering, node: fx.Node, quantizer: nn.Module) -> str:
    """QuantizeLinear -> Clip(qmin, qmax) -> DequantizeLinear; the DQ output is named after the
    FX node, the integer codes after it with ``_codes``."""
    assert isinstance(quantizer, FakeQuantizer)
    params = activation_params(quantizer, node.name)
    b = ctx.builder
    source = ctx.tensor(node.args[0], node)
    scale = b.initializer(f"{node.name}_scale", params.scale)
    zero_point = b.initializer(f"{node.name}_zero_point", params.storage_zero_point)
    axis = {} if params.axis is None else {"axis": params.axis}
    grid = params.grid
    if grid.needs_clip:
        quantized = b.node("QuantizeLinear", [source, scale, zero_point], f"{node.name}_quantize",
                           **axis)
        low = b.constant(np.array(grid.qmin + grid.offset, dtype=grid.storage))
        high = b.constant(np.array(grid.qmax + grid.offset, dtype=grid.storage))
        codes = b.node("Clip", [quantized, low, high], f"{node.name}_codes",
                       doc=f"{grid.bits}-bit grid inside {grid.storage}")
    else:
        codes = b.node("QuantizeLinear", [source, scale, zero_point], f"{node.name}_codes", **axis)
    output = b.node("DequantizeLinear", [codes, scale, zero_point], node.name, **axis)
    ctx.quantized[output] = params
    ctx.entries.append(TensorEntry.build(
        name=output, role="activation", layer=node.name, bits=grid.bits, signed=grid.signed,
        qrange=(grid.qmin, grid.qmax), scale=params.scale, zero_point=params.zero_point,
        axis=params.axis, storage=grid.storage, storage_offset=grid.offset,
        onnx={"codes": codes, "scale": scale, "zero_point": zero_point},
    ))
    return output


def _input_scale(ctx: Lowering, source: str) -> float | None:
    """The per-tensor step of a quantized input, which fixes the int32 bias scale."""
    params: QuantParams | None = ctx.quantized.get(source)
    if params is None or params.axis is not None:
        return None
    return float(params.scale)


def _emit_weight(ctx: Lowering, layer_name: str, folded: FoldedLayer, params: QuantParams,
                 bn_name: str | None) -> str:
    """Integer codes -> (Cast to int8 -> Mul by 2**shift, when packed) -> DequantizeLinear."""
    b = ctx.builder
    grid = params.grid
    dtype = storage_dtype(grid.bits, grid.signed, ctx.export_format == "packed")
    container = np.dtype(np.int8 if grid.signed else np.uint8)
    shift = folded.shift
    if dtype == container:
        codes = b.initializer(f"{layer_name}_weight_codes",
                              to_storage(folded.codes << shift, container))
        widened = codes
    else:
        ctx.need_opset(_STORAGE_OPSET[dtype.name], f"{layer_name}: {dtype.name} weight storage")
        codes = b.initializer(f"{layer_name}_weight_codes", to_storage(folded.codes, dtype))
        widened = b.node("Cast", [codes], f"{layer_name}_weight_unpack",
                         to=_ONNX_INT[container.name])
        if shift:
            factor = b.constant(np.array(1 << shift, dtype=container))
            widened = b.node("Mul", [widened, factor], f"{layer_name}_weight_shift")
    scale = b.initializer(f"{layer_name}_weight_scale", folded.dequant_scale)
    zero_point = b.initializer(f"{layer_name}_weight_zero_point",
                               to_storage(folded.zero_point << shift, container))
    weight = b.node("DequantizeLinear", [widened, scale, zero_point], f"{layer_name}_weight",
                    axis=0)
    notes: dict[str, object] = {"trained_scale": np.asarray(params.scale, np.float64).tolist()}
    if bn_name is not None:
        notes["folded_batchnorm"] = bn_name
    if folded.constant_channels:
        notes["constant_channels"] = list(folded.constant_channels)
    ctx.entries.append(TensorEntry.build(
        name=weight, role="weight", layer=layer_name, bits=grid.bits, signed=grid.signed,
        qrange=(grid.qmin, grid.qmax), scale=folded.scale, zero_point=folded.zero_point, axis=0,
        storage=dtype.name, storage_offset=0, code_shift=shift,
        onnx={"codes": codes, "dequantize_input": widened, "scale": scale,
              "zero_point": zero_point},
        notes=notes,
    ))
    return weight


def _emit_bias(ctx: Lowering, layer_name: str, folded: FoldedLayer) -> str | None:
    b = ctx.builder
    if folded.bias_codes is None or folded.bias_scale is None:
        if folded.bias is None:
            return None
        return b.initializer(f"{layer_name}_bias", folded.bias.astype(np.float32))
    codes = b.initializer(f"{layer_name}_bias_codes", folded.bias_codes)
    scale = b.initializer(f"{layer_name}_bias_scale", folded.bias_scale)
    bias = b.node("DequantizeLinear", [codes, scale], f"{layer_name}_bias", axis=0)
    ctx.entries.append(TensorEntry.build(
        name=bias, role="bias", layer=layer_name, bits=32, signed=True,
        qrange=(-(2**31), 2**31 - 1), scale=folded.bias_scale,
        zero_point=np.zeros(folded.bias_codes.shape, np.int64), axis=0, storage="int32",
        storage_offset=0, onnx={"codes": codes, "scale": scale},
        notes={"scale_is": "input scale x weight scale"},
    ))
    return bias


@module_handler(QuantizedLayer)
def lower_quantized_layer(ctx: Lowering, node: fx.Node, module: nn.Module) -> str:
    assert isinstance(module, QuantizedLayer)
    layer = module.layer
    if type(layer) not in (*_CONVS, nn.Linear):
        raise ExportError(f"{node.name}: quantized {type(layer).__name__} has no ONNX lowering")
    source = ctx.tensor(node.args[0], node)
    params = weight_params(module.weight_quantizer, f"{node.name}.weight")
    if params.axis not in (None, 0):
        raise ExportError(f"{node.name}: weights quantized along axis {params.axis}; need 0")
    if getattr(module, "input_quantizer", None) is not None:
        raise ExportError(f"{node.name}: a layer with its own input quantizer is not exported")
    terms = layer_terms(module, node.name)
    codes = weight_codes(module.weight_quantizer, terms.weight)
    bn_node = None if terms.folded_in_training else foldable_batchnorm(
        node, ctx.modules, codes.shape[0])
    bn = None
    if bn_node is not None:
        bn = BatchNormFold.from_module(bn_node.name, ctx.modules[str(bn_node.target)])
    folded = fold_layer(codes, params.scale, params.zero_point, terms.bias, bn,
                        _input_scale(ctx, source), node.name, shift=code_shift(params.grid.bits))
    weight = _emit_weight(ctx, node.name, folded, params, bn.name if bn else None)
    bias = _emit_bias(ctx, node.name, folded)
    output = _emit_layer(ctx, node, layer, source, weight, bias,
                         doc=f"BatchNorm {bn.name} folded in" if bn else None)
    if bn_node is not None:
        ctx.folded_into[bn_node.name] = output
    return output


def _emit_layer(ctx: Lowering, node: fx.Node, layer: nn.Module, source: str, weight: str,
                bias: str | None, doc: str | None = None) -> str:
    b = ctx.builder
    inputs = [source, weight] + ([bias] if bias is not None else [])
    if isinstance(layer, nn.Linear):
        if ctx.rank(node.args[0]) == 2:  # type: ignore[arg-type]
            return b.node("Gemm", inputs, node.name, transB=1, doc=doc)
        transposed = b.node("Transpose", [weight], f"{node.name}_weight_t", perm=[1, 0])
        product = b.node("MatMul", [source, transposed], f"{node.name}_matmul")
        if bias is None:
            return b.node("Identity", [product], node.name)
        return b.node("Add", [product, bias], node.name, doc=doc)
    assert isinstance(layer, _CONVS)
    if layer.padding_mode != "zeros":
        raise ExportError(f"{node.name}: padding_mode={layer.padding_mode} is not exported")
    dims = layer.weight.dim() - 2
    padding = layer.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * dims
        else:
            raise ExportError(f"{node.name}: padding='same' is not exported; use explicit padding")
    return b.node(
        "Conv", inputs, node.name, doc=doc,
        kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
        pads=list(padding) * 2, dilations=list(layer.dilation), group=layer.groups,
    )


@module_handler(*_CONVS, nn.Linear)
def lower_float_layer(ctx: Lowering, node: fx.Node, layer: nn.Module) -> str:
    """A layer the recipe left in float: float weights and bias."""
    b = ctx.builder
    source = ctx.tensor(node.args[0], node)
    weight = b.initializer(f"{node.name}_weight", layer.weight.detach().cpu().numpy())
    bias = None
    if layer.bias is not None:
        bias = b.initializer(f"{node.name}_bias", layer.bias.detach().cpu().numpy())
    return _emit_layer(ctx, node, layer, source, weight, bias)


@module_handler(*BATCHNORMS)
def lower_batchnorm(ctx: Lowering, node: fx.Node, bn: nn.Module) -> str:
    """A BatchNorm that could not be folded: eval-mode BatchNormalization."""
    assert isinstance(bn, BATCHNORMS)
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"{node.name}: BatchNorm without running statistics cannot be exported")
    b = ctx.builder
    channels = bn.num_features
    weight = bn.weight.detach() if bn.weight is not None else None
    params = {
        "scale": weight.cpu().numpy() if weight is not None else np.ones(channels, np.float32),
        "bias": bn.bias.detach().cpu().numpy() if bn.bias is not None
        else np.zeros(channels, np.float32),
        "mean": bn.running_mean.detach().cpu().numpy(),
        "var": bn.running_var.detach().cpu().numpy(),
    }
    names = [b.initializer(f"{node.name}_{key}", value.astype(np.float32))
             for key, value in params.items()]
    return b.node("BatchNormalization", [ctx.tensor(node.args[0], node), *names], node.name,
                  epsilon=float(bn.eps))
