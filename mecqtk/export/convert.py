"""Convert stage: a calibrated or trained fake-quant GraphModule to its deploy form.

The deploy form computes what the exported ONNX file computes, with PyTorch ops plus mecqtk's two
registered operators (:mod:`mecqtk.quant.qdq_op`):

- every activation quantizer becomes a :class:`FrozenQuantizer`: its step size and zero point
  frozen as buffers, one ``mecqtk::quantize_dequantize`` call on the ONNX container grid (uint8;
  a signed grid is shifted by 128 so onnxruntime's integer kernels take it);
- every quantized Conv/Linear becomes a :class:`DeployLayer`: integer weight codes (int8
  containers, low-bit codes shifted left, see :func:`~mecqtk.export.weights.code_shift`) with
  per-channel scales, the BatchNorm that follows it folded into those scales (never dividing by
  gamma) and its bias on the int32 accumulator grid, both dequantized by ``mecqtk::dequantize``.

Nested leaf graphs are converted like the top graph; eager layers (called by leaf code) keep
their own input quantizer and are not folded. Without BatchNorm folding the deploy form equals
the fake-quant model bit for bit; a folded layer computes ``conv(x, w * g) + b`` instead of
``bn(conv(x, w))``, which differs by float rounding only (tested: equal activation codes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

import mecqtk.quant.qdq_op  # noqa: F401  (registers torch.ops.mecqtk)
from mecqtk.errors import ExportError
from mecqtk.export.integer_kernels import IntegerRequantization, OutputGrid, quantizes
from mecqtk.export.qparams import activation_params, weight_codes, weight_params
from mecqtk.export.snap import input_quantizer
from mecqtk.export.weights import (
    BatchNormFold,
    FoldedLayer,
    code_shift,
    fold_layer,
    foldable_batchnorm,
    layer_terms,
)
from mecqtk.graph.introspect import graph_modules, requantizing_quantizer
from mecqtk.graph.ops import preserves_grid, selects_values
from mecqtk.quant.layer_forms import WeightInterceptor, layer_form
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer

Tensor = torch.Tensor


class FrozenQuantizer(nn.Module):
    """An activation quantizer with frozen step size: one ``mecqtk::quantize_dequantize`` call.

    ``zero_point`` is stored in the ONNX container type; ``qmin``/``qmax`` are the logical grid
    shifted by ``offset`` into that container.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                 axis: int | None, bits: int, signed: bool, offset: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point)
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.bits, self.signed, self.offset = bits, signed, offset
        self.regrid_of: str | None = None  # set on the exact requantization after a max pool

    @classmethod
    def from_fake(cls, quantizer: FakeQuantizer, where: str) -> FrozenQuantizer:
        params = activation_params(quantizer, where)
        offset = params.grid.offset
        zero_point = torch.from_numpy(np.asarray(params.storage_zero_point))
        return cls(torch.from_numpy(np.asarray(params.scale, np.float32)), zero_point,
                   params.grid.qmin + offset, params.grid.qmax + offset, params.axis,
                   params.grid.bits, params.grid.signed, offset)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, stored=[{self.qmin}, {self.qmax}]"

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mecqtk.quantize_dequantize(
            x.float(), self.scale, self.zero_point, self.qmin, self.qmax, self.axis or 0)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Logical integer codes of ``x`` (the stored codes minus ``offset``), as int32."""
        step = self.scale if self.axis is None else self.scale.reshape(
            [-1 if d == self.axis else 1 for d in range(x.dim())])
        zero = self.zero_point.to(torch.float32)
        zero = zero if self.axis is None else zero.reshape(step.shape)
        stored = (torch.round(x.float() / step) + zero).clamp(self.qmin, self.qmax)
        return (stored - self.offset).to(torch.int32)


class DeployLayer(nn.Module):
    """A Conv/Linear computing with dequantized integer weights and an int32 (or float) bias.

    ``layer`` is the original module without its weight and bias (its form computes the rest:
    padding, stride, groups); an eager layer also carries its ``input_quantizer``.
    """

    def __init__(self, layer: nn.Module, folded: FoldedLayer, storage: torch.dtype,
                 input_quantizer: nn.Module | None, float_form_weight: bool) -> None:
        super().__init__()
        self.layer = layer
        self.input_quantizer = input_quantizer
        self.bits_shift = folded.shift
        self.folded_batchnorm = False
        self.notes: dict[str, object] = {}  # what the quant manifest records about this layer
        self.float_bias_reason = folded.float_bias_reason
        stored = folded.codes << folded.shift
        self.register_buffer("weight_codes", torch.from_numpy(stored).to(storage))
        self.register_buffer("weight_scale", torch.from_numpy(folded.dequant_scale))
        self.register_buffer(
            "weight_zero_point", torch.from_numpy(folded.zero_point << folded.shift).to(storage))
        self.bias_codes: Tensor | None
        self.bias_scale: Tensor | None
        self.bias_float: Tensor | None
        codes = scale = real = None
        if folded.bias_codes is not None and folded.bias_scale is not None:
            codes = torch.from_numpy(folded.bias_codes)
            scale = torch.from_numpy(folded.bias_scale)
        elif folded.bias is not None:
            real = torch.from_numpy(folded.bias.astype(np.float32))
        self.register_buffer("bias_codes", codes)
        self.register_buffer("bias_scale", scale)
        self.register_buffer("bias_float", real)
        # a layer without a known form computes its weight itself: it is intercepted instead
        self.float_form_weight = float_form_weight
        self.requantization: IntegerRequantization | None = None

    # Properties, as on the layer they replace: leaf code reads ``layer.weight.device``
    # (timm's edgenext positional encoding).
    @property
    def weight(self) -> Tensor:
        return torch.ops.mecqtk.dequantize(self.weight_codes, self.weight_scale,
                                           self.weight_zero_point, 0)

    @property
    def bias(self) -> Tensor | None:
        if self.bias_codes is not None and self.bias_scale is not None:
            return torch.ops.mecqtk.dequantize(self.bias_codes, self.bias_scale,
                                               torch.zeros_like(self.bias_codes), 0)
        return self.bias_float

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        form = layer_form(self.layer)
        if (self.requantization is not None and form is not None
                and not torch.compiler.is_exporting()):
            # the file holds DequantizeLinear -> Conv -> QuantizeLinear; this is what the
            # runtime computes for that group (the export traces the plain form below)
            return self.requantization(self, form, x)
        weight = self.weight
        if form is None or self.float_form_weight:
            with WeightInterceptor(lambda _: weight):
                return self.layer(x)
        return form.apply(self.layer, x, weight, self.bias)


@dataclass
class ConvertReport:
    """What :func:`convert` did."""

    layers: int = 0
    folded_batchnorms: int = 0
    quantizers: int = 0
    regrids: int = 0
    float_bias_layers: list[str] | None = None


def _strip_parameters(layer: nn.Module) -> nn.Module:
    stripped = copy.copy(layer)
    stripped._parameters = dict(layer._parameters)
    stripped.register_parameter("weight", None)
    if "bias" in stripped._parameters:
        stripped.register_parameter("bias", None)
    return stripped


def integer_requantization(layer: DeployLayer, input_step: float | None,
                           found: tuple[FakeQuantizer, bool] | None,
                           where: str) -> IntegerRequantization | None:
    """The integer kernel onnxruntime runs for ``layer`` (QLinearConv or QGemm, see
    :mod:`~mecqtk.export.integer_kernels`), given the quantizer that reads its output directly
    (:func:`~mecqtk.graph.introspect.requantizing_quantizer`). A Linear whose output stays float
    still runs as QGemm, with a float output. None when the runtime computes the layer in float:
    a conv whose output goes elsewhere, an input or bias off the integer grid, or a ReLU before
    a quantizer whose zero point is not its container's minimum (onnxruntime drops such a ReLU
    only when it changes nothing)."""
    is_linear = isinstance(layer.layer, nn.Linear)
    if (input_step is None or layer.bias_float is not None
            or not (is_linear or isinstance(layer.layer, nn.modules.conv._ConvNd))
            or layer_form(layer.layer) is None or layer.float_form_weight):
        return None
    quantizer, relu = found if found is not None else (None, False)
    if quantizer is None or not quantizes(quantizer) or quantizer.axis is not None:
        return IntegerRequantization(input_step, None) if is_linear and not relu else None
    output = OutputGrid.of(quantizer, where)
    if relu and output.zero != torch.iinfo(output.container).min:
        return None
    return IntegerRequantization(input_step, output)


def _deploy_layer(module: QuantizedLayer, where: str, bn: nn.Module | None,
                  input_step: float | None, bn_name: str | None = None,
                  output: tuple[FakeQuantizer, bool] | None = None) -> DeployLayer:
    params = weight_params(module.weight_quantizer, where)
    terms = layer_terms(module, where)
    codes = weight_codes(module.weight_quantizer, terms.weight)
    fold = None if bn is None else BatchNormFold.from_module(where, bn)
    folded = fold_layer(codes, params.scale, params.zero_point, terms.bias, fold, input_step,
                        where, shift=code_shift(params.grid.bits))
    storage = torch.int8 if params.grid.signed else torch.uint8
    input_q = module.input_quantizer
    has_form = layer_form(module.layer) is not None
    layer = _strip_parameters(module.layer) if has_form else module.layer
    deploy = DeployLayer(layer, folded, storage, input_q, float_form_weight=not has_form)
    deploy.folded_batchnorm = bn is not None
    deploy.requantization = integer_requantization(deploy, input_step, output, where)
    deploy.notes = {
        "trained_scale": np.asarray(params.scale, np.float32).reshape(-1).tolist(),
        "folded_batchnorm": bn_name,
        "constant_channels": list(folded.constant_channels),
        **({"float_bias": folded.float_bias_reason} if folded.float_bias_reason else {}),
    }
    return deploy


def _input_step(module: QuantizedLayer, node: fx.Node | None,
                modules: dict[str, nn.Module]) -> float | None:
    quantizer = module.input_quantizer
    if quantizer is None and node is not None:
        quantizer = input_quantizer(node, modules)
    if isinstance(quantizer, FakeQuantizer) and quantizer.axis is None:
        return float(quantizer.step_size().item())
    return None


def _batchnorm_tail(bn: nn.Module) -> nn.Module | None:
    """What a normalisation layer does after normalising (timm's BatchNormAct2d: dropout, then
    the activation), or None for a plain BatchNorm."""
    parts = [getattr(bn, name, None) for name in ("drop", "act")]
    parts = [p for p in parts if isinstance(p, nn.Module) and not isinstance(p, nn.Identity)]
    return nn.Sequential(*parts) if parts else None


def _regrid_max_pools(graph_module: fx.GraphModule, prefix: str) -> int:
    """After a max pool, slice or zero pad of quantized values, quantize again on the input's
    grid.

    The values are already on that grid (zero is on every grid), so this changes nothing (bit
    for bit), but it gives onnxruntime the DequantizeLinear -> MaxPool -> QuantizeLinear group it
    runs on uint8 codes, and a quantized operand for the QLinearAdd of a strided-slice-plus-pad
    shortcut.
    """
    modules = dict(graph_module.named_modules())

    def picks_values(node: fx.Node) -> bool:
        # a max pool, or a slice / zero pad of a quantized value (option-A ResNet shortcuts)
        return preserves_grid(node, modules) or (
            node.op == "call_function" and selects_values(node, modules))

    added = 0
    for node in list(graph_module.graph.nodes):
        if not picks_values(node) or all(picks_values(user) for user in node.users):
            continue  # regrid once, at the end of a chain of value-picking ops
        source = node.args[0] if node.args else None
        while isinstance(source, fx.Node) and picks_values(source):
            source = source.args[0] if source.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        quantizer = modules.get(str(source.target))
        if not isinstance(quantizer, FakeQuantizer) or quantizer.axis is not None:
            continue
        if all(u.op == "call_module" and isinstance(modules.get(str(u.target)), FakeQuantizer)
               for u in node.users):
            continue
        target = f"{source.target}_regrid_{node.name}"
        where = f"{prefix}.{target}" if prefix else target
        regrid_quantizer = FrozenQuantizer.from_fake(quantizer, where)
        regrid_quantizer.regrid_of = str(source.target)
        graph_module.add_submodule(target, regrid_quantizer)
        modules[target] = regrid_quantizer  # a later chain may start from this node
        with graph_module.graph.inserting_after(node):
            regrid = graph_module.graph.call_module(target, (node,))
        node.replace_all_uses_with(regrid, delete_user_cb=lambda user, new=regrid: user is not new)
        added += 1
    graph_module.recompile()
    return added


@torch.no_grad()
def convert(gm: nn.Module) -> tuple[nn.Module, ConvertReport]:
    """The deploy form of a calibrated fake-quant model (``gm`` itself is not changed).

    Example:
        >>> deploy, report = convert(qmodel.eval())
        >>> torch.onnx.export(deploy, (x,), dynamo=True,
        ...                   custom_translation_table=mecqtk.export.translate.translation_table())
    """
    if gm.training:
        raise ExportError("the model is in training mode; call .eval() before converting")
    deploy = copy.deepcopy(gm).cpu()
    report = ConvertReport(float_bias_layers=[])
    graphs = list(graph_modules(deploy)) if isinstance(deploy, fx.GraphModule) else [
        (name, m) for name, m in deploy.named_modules() if isinstance(m, fx.GraphModule)]
    for prefix, graph_module in graphs:
        modules = dict(graph_module.named_modules())
        for node in list(graph_module.graph.nodes):
            if node.op != "call_module":
                continue
            module = modules.get(str(node.target))
            if not isinstance(module, QuantizedLayer) or isinstance(module, DeployLayer):
                continue
            where = f"{prefix}.{node.target}" if prefix else str(node.target)
            channels = int(module.weight_quantizer.codes(module.effective_weight()).shape[0])
            bn_node = None
            if not callable(getattr(module, "folded_bias", None)):
                bn_node = foldable_batchnorm(node, modules, channels)
            bn = None if bn_node is None else modules[str(bn_node.target)]
            layer = _deploy_layer(module, where, bn, _input_step(module, node, modules),
                                  None if bn_node is None else bn_node.name,
                                  requantizing_quantizer(node, modules, bn_node))
            graph_module.set_submodule(str(node.target), layer)
            if bn_node is not None:
                tail = _batchnorm_tail(bn)
                if tail is None:
                    bn_node.replace_all_uses_with(node)
                    graph_module.graph.erase_node(bn_node)
                else:  # timm's BatchNormAct2d: its dropout and activation stay
                    graph_module.set_submodule(str(bn_node.target), tail)
                report.folded_batchnorms += 1
            report.layers += 1
            if layer.float_bias_reason:
                report.float_bias_layers.append(f"{where}: {layer.float_bias_reason}")
        graph_module.recompile()
    for prefix, graph_module in graphs:
        report.regrids += _regrid_max_pools(graph_module, prefix)
    # eager layers (called by leaf code, outside any graph): no folding
    for name, module in list(deploy.named_modules()):
        if isinstance(module, QuantizedLayer):
            deploy.set_submodule(name, _deploy_layer(module, name, None, _input_step(
                module, None, {})))
            report.layers += 1
    for name, module in list(deploy.named_modules()):
        if isinstance(module, FakeQuantizer):
            deploy.set_submodule(name, FrozenQuantizer.from_fake(module, name))
            report.quantizers += 1
    return deploy.eval(), report
