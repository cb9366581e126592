"""mecqtk's quantizer as one registered operator, with ONNX's meaning.

``torch.ops.mecqtk.quantize_dequantize(x, scale, zero_point, qmin, qmax, axis)`` computes what
ONNX's QuantizeLinear -> Clip(qmin, qmax) -> DequantizeLinear computes, in float32 and bit for
bit: ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``,
``y = (q - zero_point) * scale``. ``zero_point`` is a tensor in its ONNX container type (uint8 or
int8), ``qmin``/``qmax`` are on that container's scale and ``axis`` is the channel axis of a
per-channel ``scale`` (ignored when ``scale`` holds one value).

``torch.ops.mecqtk.dequantize(codes, scale, zero_point, axis)`` is ONNX's DequantizeLinear of a
stored integer tensor (weights, int32 biases).

Both are plain functions of their inputs (no autograd), so torch.export keeps each as one node
and :mod:`mecqtk.export.translate` gives the ONNX exporter its translation. The arithmetic is
the training quantizer's forward kernel (:mod:`mecqtk.quant.arith`), not a copy of it; training
itself calls that kernel through an autograd.Function, which carries what the exported operator
has no use for: the step floor, LSQ's gradient scale, a learned (float) zero point and the codes
kept for the backward.
"""

from __future__ import annotations

import torch

from mecqtk.quant.arith import _forward_kernel

Tensor = torch.Tensor


def _shaped(t: Tensor, like: Tensor, axis: int) -> Tensor:
    """``t`` (one value or one per channel along ``axis``) broadcastable against ``like``."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


@torch.library.custom_op("mecqtk::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        axis: int) -> Tensor:
    # the training quantizer's own forward arithmetic (one implementation of the grid)
    out, _, _ = _forward_kernel(x, _shaped(scale, x, axis), None,
                                _shaped(zero_point, x, axis).to(torch.float32), qmin, qmax)
    return out


@quantize_dequantize.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("mecqtk::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    step = _shaped(scale, codes, axis)
    zero = _shaped(zero_point, codes, axis)
    return (codes.to(torch.float32) - zero.to(torch.float32)) * step


@dequantize.register_fake
def _(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
