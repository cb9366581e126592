"""Fake-quantization arithmetic that equals ONNX QuantizeLinear -> DequantizeLinear bit for bit.

ONNX computes ``q = saturate(round_half_even(x / scale) + zero_point)`` and
``y = (q - zero_point) * scale`` in float32. We do the same: divide by the step (never multiply
by its reciprocal, which rounds differently), ``torch.round`` (half to even), clamp to the integer
range. Gradients are LSQ's: straight-through for ``x`` inside the range, and for the step size
``d y / d s = q - x/s`` inside, ``q`` (the clamped bound) outside, times a gradient scale.
"""

from __future__ import annotations

import math

import torch


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid [qmin, qmax] of a ``bits``-wide signed or unsigned code."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def lsq_grad_scale(elements_per_step: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(elements_per_step, 1) * max(qmax, 1))


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` back to ``shape``, the shape of a tensor that was broadcast against it."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + i for i, s in enumerate(shape) if s == 1 and grad.shape[lead + i] != 1
    ]
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale):
        scaled = x / scale
        codes = torch.round(scaled)
        if zero_point is not None:
            codes.add_(zero_point)
        codes.clamp_(qmin, qmax)
        if zero_point is not None:
            codes.sub_(zero_point)
        ctx.save_for_backward(scaled, scale, zero_point)
        ctx.bounds = (qmin, qmax, grad_scale)
        ctx.needs = ctx.needs_input_grad[:3]
        return codes.mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):
        scaled, scale, zero_point = ctx.saved_tensors
        qmin, qmax, grad_scale = ctx.bounds
        need_x, need_scale, need_zp = ctx.needs
        # Range test in code space: round(x/s) + z inside [qmin, qmax] <=> x/s inside
        # [qmin - z, qmax - z] (up to the rounding margin, which LSQ ignores too).
        low, high = (qmin, qmax) if zero_point is None else (qmin - zero_point, qmax - zero_point)
        below = scaled < low
        above = scaled > high
        outside = below | above
        grad_x = grad_out.masked_fill(outside, 0.0) if need_x else None
        grad_scale_t = grad_zp = None
        if need_scale:
            # inside: round(x/s) - x/s ; outside: the clamped code (q - z)
            d_scale = torch.round(scaled).sub_(scaled).masked_fill_(outside, 0.0)
            d_scale = torch.where(below, low, d_scale)
            d_scale = torch.where(above, high, d_scale)
            grad_scale_t = _reduce_to(d_scale.mul_(grad_out), scale.shape) * grad_scale
        if need_zp and zero_point is not None:
            # outside: y = (bound - z) * s, so dy/dz = -s; inside the STE gives 0
            d_zp = torch.where(outside, -scale, torch.zeros_like(scale)) * grad_out
            grad_zp = _reduce_to(d_zp, zero_point.shape) * grad_scale
        return grad_x, grad_scale_t, grad_zp, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    zero_point: torch.Tensor | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid ``scale * ([qmin, qmax] - zero_point)``.

    ``scale`` (and ``zero_point``, which must hold integers) broadcast against ``x``.

    Example:
        >>> fake_quantize(torch.tensor([0.26, -3.0]), torch.tensor(0.5), -2, 1)
        tensor([ 0.5000, -1.0000])
    """
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_scale)


def quantize_to_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """The integer codes (as float) that ONNX QuantizeLinear would produce for ``x``."""
    codes = torch.round(x / scale)
    if zero_point is not None:
        codes = codes + zero_point
    return codes.clamp(qmin, qmax)
