"""What onnxruntime's integer kernels compute, for the deploy form to compute the same.

The exported file holds QuantizeLinear/DequantizeLinear pairs around float ops. onnxruntime fuses
a group such as DequantizeLinear -> Conv -> QuantizeLinear into one integer kernel, whose
arithmetic is exact integer sums followed by one float32 requantization, ``round(float32(acc) *
m)``. PyTorch's float op followed by ``round(y / s_y)`` rounds differently wherever a value sits
near a half code: one moved code in millions changed 1-2 % of the top-1 decisions of 4-bit hrnet
and dla34, and 2x2 squeeze-excitation means of mobilenetv3 land on exact halves (sum / 4) every
few values. So the deploy form, and the model in eval mode (:mod:`~mecqtk.export.deploy_eval`),
compute the kernels' arithmetic for these groups; each returns its output quantizer's
dequantized output, which that quantizer then passes on unchanged. While ``torch.export`` traces
the deploy form they compute the plain float op, which is what the file holds.

onnxruntime's formulas (x86, MLAS):

- QLinearConv: ``acc = sum((x - zx) * (w - zw)) + bias_codes`` (int32),
  ``m[c] = float32(float32(s_x * s_w[c]) / s_y)``, ``q = clamp(round_half_even(float32(acc) *
  m[c]) + zy)``.
- QGemm (a Linear on a 2-D input): QLinearConv's arithmetic with a quantized output; with a float
  output ``float32(float32(acc + bias_codes) * float32(s_x * s_w[c]))``.
- MatMulIntegerToFloat (a Linear on a 3-D or wider input, batch size unknown), then the float
  bias Add: ``float32(float32(acc) * float32(s_x * s_w[c])) + float32(bias_codes * s_b[c])``.
- QLinearGlobalAveragePool: ``acc = sum(x - zx)`` over the H*W pixels,
  ``m = float32(s_x / float32(s_y * float32(H*W)))``, the same rounding; the kernel refuses an
  ``m`` outside [2**-32, 256) (then the graph keeps a float ReduceMean, see
  :func:`~mecqtk.export.onnx_export.global_average_pools`).
- QLinearAdd (x86-64 with FMA, MLAS ``qladd_avx2``): ``r_a = float32(s_a / s_c)``,
  ``r_b = float32(s_b / s_c)``, ``f = float32(z_c - float32(r_a * z_a + r_b * z_b))``, then per
  value ``c = saturate(round_half_even(fma(a, r_a, fma(b, r_b, f))))`` on the stored codes; with
  a constant ``b`` (a requantization, ``Add(x, 0)``) ``f += float32(b * r_b)`` first. Measured
  against onnxruntime 1.32 on 1.2 M values over 300 random scale and zero-point combinations:
  identical. ARM builds use a fixed-point kernel instead: there the export's self-check refuses
  the file, it does not pass silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mecqtk.export.qparams import activation_params
from mecqtk.quant.layer_forms import LayerForm
from mecqtk.quant.quantizers import FakeQuantizer, Mode

Tensor = torch.Tensor

# the range of the step ratio QLinearGlobalAveragePool accepts (MLAS throws outside it)
QLINEAR_POOL_RATIO = (2.0**-32, 256.0)


def qlinear_pool_multiplier(input_step: float, output_step: float, pixels: int) -> float | None:
    """QLinearGlobalAveragePool's float32 multiplier, or None when the kernel refuses it."""
    f32 = np.float32
    ratio = f32(f32(input_step) / f32(f32(output_step) * f32(pixels)))
    low, high = QLINEAR_POOL_RATIO
    return float(ratio) if low <= ratio < high else None


def quantizes(quantizer: Any) -> bool:
    """Whether ``quantizer`` (fake-quant or frozen) is on its integer grid now."""
    if isinstance(quantizer, FakeQuantizer):
        return quantizer.mode is Mode.QUANTIZE and bool(quantizer.initialized)
    return quantizer is not None


@dataclass(frozen=True)
class OutputGrid:
    """A per-tensor activation quantizer's grid as the file stores it: its float32 step, its
    zero point and container, and its clamp on the grid of codes minus the zero point."""

    step: float
    zero: int
    low: float
    high: float
    container: torch.dtype

    @classmethod
    def of(cls, quantizer: Any, where: str = "") -> OutputGrid:
        """From a :class:`FakeQuantizer` or a frozen quantizer of the convert stage."""
        if isinstance(quantizer, FakeQuantizer):
            params = activation_params(quantizer, where)
            zero = int(np.asarray(params.storage_zero_point).reshape(-1)[0])
            qmin = params.grid.qmin + params.grid.offset
            qmax = params.grid.qmax + params.grid.offset
            step = float(np.asarray(params.scale, np.float32).reshape(-1)[0])
            container = torch.from_numpy(np.asarray(params.storage_zero_point)).dtype
        else:
            zero = int(quantizer.zero_point.reshape(-1)[0].item())
            qmin, qmax = quantizer.qmin, quantizer.qmax
            step = float(quantizer.scale.reshape(-1)[0].item())
            container = quantizer.zero_point.dtype
        return cls(step, zero, float(qmin - zero), float(qmax - zero), container)

    def dequantized(self, scaled: Tensor) -> Tensor:
        """The quantizer's output for the requantized values ``scaled`` (float32)."""
        step = torch.tensor(self.step, dtype=torch.float32, device=scaled.device)
        return torch.round(scaled).clamp(self.low, self.high) * step


def qlinear_add(a: Tensor, a_grid: OutputGrid, b: Tensor | float, b_grid: OutputGrid,
                out: OutputGrid) -> Tensor:
    """QLinearAdd's output codes (stored, with the zero point, rounded, before saturation) for
    the stored codes ``a`` and ``b`` (a tensor, or one constant code), as float32.

    Each fused multiply-add is computed in float64, where it is exact (an 8-bit code times a
    float32 ratio needs 32 bits, and the sum stays within 53 while the ratios exceed 2**-20), and
    rounded to float32 once, as the FMA instruction rounds.
    """
    f32 = np.float32
    ratio_a = f32(f32(a_grid.step) / f32(out.step))
    ratio_b = f32(f32(b_grid.step) / f32(out.step))
    fixed = f32(f32(out.zero) - f32(f32(ratio_a * f32(a_grid.zero))
                                    + f32(ratio_b * f32(b_grid.zero))))
    if isinstance(b, float):
        partial: Tensor | float = float(f32(fixed + f32(f32(b) * ratio_b)))
    else:
        partial = (b.double() * float(ratio_b) + float(fixed)).float().double()
    codes = torch.round((a.double() * float(ratio_a) + partial).float())
    # the conversion to int32 (cvtps2dq) turns a value outside int32 into INT32_MIN, which then
    # saturates to the container's lowest code, not its highest (a step ratio of 1e14 was seen
    # in a barely trained levit)
    outside = ~((codes >= -(2.0**31)) & (codes < 2.0**31))
    return torch.where(outside, torch.full_like(codes, -(2.0**31)), codes)


class _GridsOf:
    """The :class:`OutputGrid` of some quantizers held by reference, re-read when they change."""

    def __init__(self, *quantizers: Any) -> None:
        self.quantizers = quantizers  # a tuple: not registered as submodules
        self._key: tuple | None = None
        self._grids: tuple[OutputGrid, ...] | None = None

    def emulated(self) -> tuple[OutputGrid, ...] | None:
        """The grids, or None where onnxruntime would not run the integer kernel: a quantizer
        not quantizing, per channel, or stored other than in uint8."""
        if not all(quantizes(q) and not q.training and getattr(q, "axis", None) is None
                   for q in self.quantizers):
            return None
        tensors = [t for q in self.quantizers for t in (*q.parameters(), *q.buffers())]
        key = tuple((id(t), t._version) for t in tensors)
        if self._grids is None or key != self._key:
            self._grids = tuple(OutputGrid.of(q) for q in self.quantizers)
            self._key = key
        if any(grid.container != torch.uint8 for grid in self._grids):
            return None
        return self._grids


class IntegerAdd(nn.Module):
    """``x + y`` of two quantized values read by one quantizer: in eval mode, QLinearAdd's
    arithmetic (the file keeps this ``Add``, and onnxruntime fuses it with its DequantizeLinear
    inputs and QuantizeLinear output); in training and in the export trace, the float add.
    ``relu``: a ReLU sits between the add and the quantizer; onnxruntime drops it (and the model
    computes the kernel) only where the quantizer's grid starts at zero, which then clamps."""

    def __init__(self, x_source: nn.Module, y_source: nn.Module, target: nn.Module,
                 relu: bool = False) -> None:
        super().__init__()
        self.grids = _GridsOf(x_source, y_source, target)
        self.relu = relu

    def extra_repr(self) -> str:
        return "then ReLU" if self.relu else ""

    def _emulated(self) -> tuple[OutputGrid, ...] | None:
        grids = self.grids.emulated()
        if grids is not None and self.relu and grids[2].low != 0.0:
            return None
        return grids

    def emulates(self) -> bool:
        return self._emulated() is not None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        grids = None if self.training or torch.compiler.is_exporting() else self._emulated()
        if grids is None:
            return x + y
        x_grid, y_grid, out = grids
        a = torch.round(x.float() / x_grid.step) + x_grid.zero
        b = torch.round(y.float() / y_grid.step) + y_grid.zero
        return out.dequantized(qlinear_add(a, x_grid, b, y_grid, out) - out.zero)


class IntegerRegrid(nn.Module):
    """A quantized value read by another quantizer: in eval mode, the requantization as
    onnxruntime runs it, a QLinearAdd of the codes and a constant zero (the export writes
    ``Add(x, DequantizeLinear(0))`` before the second quantizer, see
    :func:`~mecqtk.export.onnx_export.requantize_by_adding_zero`); in training and in the export
    trace, the value unchanged. ``target_name`` is the second quantizer's module path."""

    def __init__(self, source: nn.Module, target: nn.Module, target_name: str) -> None:
        super().__init__()
        self.grids = _GridsOf(source, target)
        self.target_name = target_name

    def emulates(self) -> bool:
        return self.grids.emulated() is not None

    def forward(self, x: Tensor) -> Tensor:
        grids = None if self.training or torch.compiler.is_exporting() else self.grids.emulated()
        if grids is None:
            return x
        source, out = grids
        a = torch.round(x.float() / source.step) + source.zero
        return out.dequantized(qlinear_add(a, source, 0.0, zero_code_grid(out), out) - out.zero)


def zero_code_grid(out: OutputGrid) -> OutputGrid:
    """The grid of the constant the export adds in a requantization: code 0, zero point 0, the
    target's step (so it stands for 0.0)."""
    return OutputGrid(out.step, 0, 0.0, 0.0, torch.uint8)


class IntegerRequantization(nn.Module):
    """QLinearConv's (QGemm's) arithmetic for a conv (Linear) whose output goes straight to a
    quantizer (through the BatchNorm it absorbs and a ReLU the zero point makes redundant).

    A Linear on a 2-D input is a Gemm in the file, which onnxruntime runs as QGemm: with a
    quantizer after it, the same arithmetic as QLinearConv; with a float output (``output=None``:
    a GELU, the logits), ``float32(float32(acc + bias) * float32(s_x * s_w[c]))``. A Linear on a
    3-D or wider input is a MatMul and a bias Add, which onnxruntime runs (its batch size
    unknown) as MatMulIntegerToFloat and a float Add, the output quantizer apart:
    ``float32(float32(acc) * float32(s_x * s_w[c])) + bias``. Both measured identical to
    onnxruntime 1.32 (0 of 38 k values differ; the float Linear differed on 84 %).
    """

    def __init__(self, input_step: float, output: OutputGrid | None) -> None:
        super().__init__()
        self.register_buffer("input_scale", torch.tensor(input_step, dtype=torch.float32))
        self.register_buffer("output_scale", torch.tensor(
            1.0 if output is None else output.step, dtype=torch.float32))
        self.output = output

    @property
    def low(self) -> float:
        return -math.inf if self.output is None else self.output.low

    @property
    def high(self) -> float:
        return math.inf if self.output is None else self.output.high

    def forward(self, deploy: nn.Module, form: LayerForm, x: Tensor) -> Tensor:
        """The output of ``deploy`` (a :class:`~mecqtk.export.convert.DeployLayer` whose form
        is ``form``) for ``x``, which lies on the input grid."""
        codes = torch.round(x.float() / self.input_scale)
        shift = float(2 ** deploy.bits_shift)
        stored = deploy.weight_codes.float()
        zero = deploy.weight_zero_point.float()
        if zero.numel() > 1:
            zero = zero.reshape(-1, *[1] * (stored.dim() - 1))
        weight = (stored - zero) / shift  # exact: codes are shifted left by ``shift``
        # float32 sums integers exactly up to 2**24, and the shift only moves the exponent; one
        # float32 add of the (exact) bias rounds the exact sum as float32(int32 sum) does. Beyond
        # 2**24 (wide 8-bit layers, huge biases) accumulate in float64 instead.
        bound = codes.abs().max() * weight.abs().flatten(1).sum(1).max()
        bias = deploy.bias_codes
        wide = bool(bound >= 2 ** 24) or (bias is not None and bool(bias.abs().max() >= 2 ** 24))
        dtype = torch.float64 if wide else torch.float32
        acc = form.apply(deploy.layer, codes.to(dtype), weight.to(dtype), None) * shift
        linear = isinstance(deploy.layer, nn.Linear)
        # the output channel: dim 1 of a conv's output, the last dim of a Linear's
        channels = [-1 if d == (acc.dim() - 1 if linear else 1) else 1 for d in range(acc.dim())]
        accumulator_scale = (self.input_scale * deploy.weight_scale).reshape(channels)
        if linear and acc.dim() > 2:  # MatMulIntegerToFloat, then the float bias Add
            out = acc.float() * accumulator_scale
            return out if deploy.bias is None else out + deploy.bias
        if bias is not None:
            acc = acc + bias.to(dtype).reshape(channels)
        if self.output is None:
            return acc.float() * accumulator_scale
        return self.output.dequantized(acc.float() * (accumulator_scale / self.output_scale))


class IntegerSpatialMean(nn.Module):
    """``x.mean(dims, keepdim=True)`` over the two spatial axes, between two quantizers: in eval
    mode, QLinearGlobalAveragePool's arithmetic; in training (and in the export trace), the
    float mean, bit for bit what the graph computed before.

    The quantizers are held by reference (they are the graph's own modules): the one whose grid
    ``x`` lies on and the one that reads the mean.
    """

    def __init__(self, dims: tuple[int, ...], source: nn.Module, target: nn.Module) -> None:
        super().__init__()
        self.dims = dims
        self.quantizers = (source, target)  # a tuple: not registered as submodules
        self._key: tuple | None = None
        self._grids: tuple[OutputGrid, OutputGrid] | None = None

    def extra_repr(self) -> str:
        return f"dims={self.dims}"

    def _current_grids(self) -> tuple[OutputGrid, OutputGrid]:
        tensors = [t for q in self.quantizers for t in (*q.parameters(), *q.buffers())]
        key = tuple((id(t), t._version) for t in tensors)
        if self._grids is None or key != self._key:
            self._grids = (OutputGrid.of(self.quantizers[0]), OutputGrid.of(self.quantizers[1]))
            self._key = key
        return self._grids

    def forward(self, x: Tensor) -> Tensor:
        source, target = self.quantizers
        if (self.training or torch.compiler.is_exporting() or not quantizes(source)
                or not quantizes(target) or source.training or target.training
                or getattr(source, "axis", None) is not None
                or getattr(target, "axis", None) is not None):
            return x.mean(self.dims, keepdim=True)
        inputs, output = self._current_grids()
        multiplier = qlinear_pool_multiplier(inputs.step, output.step,
                                             x.shape[-1] * x.shape[-2])
        if multiplier is None or output.container != torch.uint8:
            return x.mean(self.dims, keepdim=True)  # the file keeps a float ReduceMean
        codes = torch.round(x.float() / inputs.step)
        # exact integer sums (float32 is exact up to 2**24, and a spatial sum stays far below
        # that only for small maps and codes)
        wide = codes.abs().max() * x.shape[-1] * x.shape[-2] >= 2 ** 24
        acc = codes.to(torch.float64 if wide else torch.float32).sum(self.dims, keepdim=True)
        return output.dequantized(acc.float() * multiplier)
