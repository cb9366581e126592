"""ONNX translations of mecqtk's operators (:mod:`mecqtk.quant.qdq_op`) for ``torch.onnx.export``.

The exporter calls these while it builds the graph (onnxscript's tracing mode), so plain Python
control flow on the integer attributes decides which nodes appear. Everything that is not one of
mecqtk's operators is translated by torch.onnx itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import opset21 as op

import mecqtk.quant.qdq_op  # noqa: F401  (registers the operators)


def quantize_dequantize(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int,
                        axis: int) -> Any:
    """QuantizeLinear -> Clip(qmin, qmax) (only when the grid is narrower than its container)
    -> DequantizeLinear."""
    codes = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    bounds = (0, 255) if zero_point.dtype is not None and _is_uint8(zero_point) else (-128, 127)
    if (qmin, qmax) != bounds:
        low = op.CastLike(op.Constant(value_int=qmin), zero_point)
        high = op.CastLike(op.Constant(value_int=qmax), zero_point)
        codes = op.Clip(codes, low, high)
    return op.DequantizeLinear(codes, scale, zero_point, axis=axis)


def _is_uint8(value: Any) -> bool:
    import onnx_ir as ir

    return value.dtype == ir.DataType.UINT8


def dequantize(codes: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    """DequantizeLinear of a stored integer tensor (weight codes, int32 bias)."""
    return op.DequantizeLinear(codes, scale, zero_point, axis=axis)


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """What ``torch.onnx.export(..., custom_translation_table=...)`` needs for mecqtk's ops."""
    return {
        torch.ops.mecqtk.quantize_dequantize.default: quantize_dequantize,
        torch.ops.mecqtk.dequantize.default: dequantize,
    }
