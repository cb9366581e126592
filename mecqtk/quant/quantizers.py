"""Fake-quantizer modules. Each is a plain ``nn.Module`` whose forward reads top to bottom."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from mecqtk.quant.arith import fake_quantize, integer_range, lsq_grad_scale
from mecqtk.quant.observers import Observer
from mecqtk.quant.registry import OBSERVERS, QUANTIZERS, register_quantizer
from mecqtk.quant.spec import QuantSpec


class Mode(Enum):
    QUANTIZE = "quantize"
    OBSERVE = "observe"  # pass through unchanged, feed the calibration observer
    BYPASS = "bypass"  # pass through unchanged (to measure float behaviour)


class FakeQuantizer(nn.Module):
    """Base class: a learned step size per tensor or per channel on a symmetric integer grid.

    Args:
        spec: bits, signedness, granularity and observer.
        channels: number of channels for a per-channel quantizer (1 for per-tensor).
        axis: channel axis of the tensors this quantizer sees (per-channel only).
    """

    def __init__(self, spec: QuantSpec, channels: int = 1, axis: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.bits = spec.bits
        self.signed = spec.signed
        self.qmin, self.qmax = integer_range(spec.bits, spec.signed)
        self.per_channel = spec.granularity == "per_channel"
        self.axis = axis if self.per_channel else None
        self.scale = nn.Parameter(torch.ones(channels if self.per_channel else 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.mode = Mode.QUANTIZE
        self.observer: Observer | None = None

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, channels={self.scale.numel()}"

    def broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` (one value per channel) shaped to broadcast against ``x``."""
        if self.axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def zero_point(self) -> torch.Tensor | None:
        """The integer zero point, or None for a symmetric grid."""
        return None

    def grad_scale(self, x: torch.Tensor) -> float:
        per_step = x.numel() // self.scale.numel() if self.per_channel else x[0].numel()
        return lsq_grad_scale(per_step, self.qmax)

    def start_observing(self, observer: str | None = None) -> None:
        """Pass values through and collect them; ``observer`` overrides the spec's."""
        self.observer = OBSERVERS[observer or self.spec.observer](axis=self.axis)
        self.mode = Mode.OBSERVE

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Set the step size from what the observer saw, and go back to quantizing."""
        assert self.observer is not None, "start_observing() first"
        self.scale.copy_(self.observer.compute_scale(self.qmin, self.qmax).to(self.scale))
        self.initialized.fill_(True)
        self.observer = None
        self.mode = Mode.QUANTIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.OBSERVE:
            assert self.observer is not None
            self.observer.update(x)
            return x
        if self.mode is Mode.BYPASS:
            return x
        zero_point = self.zero_point()
        return fake_quantize(
            x,
            self.broadcast(self.scale, x),
            self.qmin,
            self.qmax,
            zero_point=None if zero_point is None else self.broadcast(zero_point, x),
            grad_scale=self.grad_scale(x),
        )

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32), exactly as ONNX QuantizeLinear produces them."""
        scaled = torch.round(x / self.broadcast(self.scale, x))
        zero_point = self.zero_point()
        if zero_point is not None:
            scaled = scaled + self.broadcast(zero_point, x)
        return scaled.clamp(self.qmin, self.qmax).to(torch.int32)


@register_quantizer("lsq")
class LSQQuantizer(FakeQuantizer):
    """Learned Step Size Quantization (Esser et al., 2020): the step is learned by gradient
    descent."""


def make_quantizer(spec: QuantSpec, channels: int = 1, axis: int = 0) -> FakeQuantizer:
    """Build the registered quantizer named by ``spec.quantizer``."""
    return QUANTIZERS[spec.quantizer](spec, channels=channels, axis=axis)
