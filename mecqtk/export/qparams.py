"""The integer grid of one quantized tensor as ONNX stores it.

A trained quantizer has a logical grid ``[qmin, qmax]`` (signed or unsigned, ``bits`` wide) and
an optional integer zero point. ONNX stores codes in a container type. Activations always use
uint8: onnxruntime's integer convolution takes uint8 activations with int8 weights, so a signed
grid is shifted by 128 (code ``c`` is stored as ``c + 128``, zero point ``z + 128``). That keeps
dequantized values identical: ``(c + 128 - (z + 128)) * s == (c - z) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mecqtk.errors import ExportError
from mecqtk.quant.quantizers import FakeQuantizer, Mode

SIGNED_ACTIVATION_OFFSET = 128


@dataclass(frozen=True)
class Grid:
    """A logical integer grid and the container that stores it."""

    bits: int
    signed: bool
    qmin: int
    qmax: int
    storage: str  # numpy dtype name of the container: uint8, int8
    offset: int  # stored code = logical code + offset

    @property
    def storage_range(self) -> tuple[int, int]:
        info = np.iinfo(np.dtype(self.storage))
        return int(info.min), int(info.max)

    @property
    def needs_clip(self) -> bool:
        """True when the grid is narrower than its container (a Clip enforces it in ONNX)."""
        return (self.qmin + self.offset, self.qmax + self.offset) != self.storage_range


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of a trained quantizer, as float32/integer numpy arrays."""

    grid: Grid
    scale: np.ndarray  # float32, shape () per tensor or (C,) per channel
    zero_point: np.ndarray  # int64 logical zero point, same shape as scale
    axis: int | None

    @property
    def storage_zero_point(self) -> np.ndarray:
        return (self.zero_point + self.grid.offset).astype(self.grid.storage)


def _check_ready(quantizer: FakeQuantizer, where: str) -> None:
    if quantizer.mode is not Mode.QUANTIZE:
        raise ExportError(
            f"{where}: quantizer is in {quantizer.mode.value} mode; export needs a calibrated "
            "model in quantize mode"
        )
    if not bool(quantizer.initialized):
        raise ExportError(f"{where}: quantizer was never calibrated; run calibration first")


def _scale_and_zero_point(quantizer: FakeQuantizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    scale = quantizer.step_size().detach().float().cpu().numpy().astype(np.float32)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ExportError(f"{where}: step size must be finite and positive, got {scale.min()}")
    zp_tensor = quantizer.zero_point()
    if zp_tensor is None:
        zero_point = np.zeros(scale.shape, dtype=np.int64)
    else:
        zp = zp_tensor.detach().cpu().double().numpy().reshape(scale.shape)
        if not np.all(zp == np.round(zp)):
            raise ExportError(f"{where}: zero point must hold integers to be exported")
        zero_point = zp.astype(np.int64)
    if quantizer.axis is None:
        return scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def _grid(quantizer: FakeQuantizer, storage: str, offset: int, where: str) -> Grid:
    grid = Grid(quantizer.bits, quantizer.signed, quantizer.qmin, quantizer.qmax, storage, offset)
    low, high = grid.storage_range
    if grid.qmin + offset < low or grid.qmax + offset > high:
        raise ExportError(f"{where}: a {grid.bits}-bit grid does not fit an 8-bit container")
    return grid


def activation_params(quantizer: FakeQuantizer, where: str) -> QuantParams:
    """An activation quantizer's grid, stored as uint8 (signed grids shifted by 128)."""
    _check_ready(quantizer, where)
    offset = SIGNED_ACTIVATION_OFFSET if quantizer.signed else 0
    grid = _grid(quantizer, "uint8", offset, where)
    scale, zero_point = _scale_and_zero_point(quantizer, where)
    stored = zero_point + offset
    if np.any(stored < 0) or np.any(stored > 255):
        raise ExportError(f"{where}: zero point {zero_point.tolist()} does not fit uint8 storage")
    return QuantParams(grid, scale, zero_point, quantizer.axis)


def weight_params(quantizer: FakeQuantizer, where: str) -> QuantParams:
    """A weight quantizer's grid, stored as int8 (signed) or uint8 (unsigned)."""
    _check_ready(quantizer, where)
    storage = "int8" if quantizer.signed else "uint8"
    grid = _grid(quantizer, storage, 0, where)
    scale, zero_point = _scale_and_zero_point(quantizer, where)
    return QuantParams(grid, scale, zero_point, quantizer.axis)


@torch.no_grad()
def weight_codes(quantizer: FakeQuantizer, weight: torch.Tensor) -> np.ndarray:
    """The integer codes (int64, logical grid) of ``weight``, exactly as the quantizer rounds."""
    return quantizer.codes(weight.detach()).cpu().numpy().astype(np.int64)
