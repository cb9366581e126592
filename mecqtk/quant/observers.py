"""Calibration observers: they watch tensors before training and propose initial step sizes.

Every observer reduces what it saw to a step size per channel (or one per tensor) with the same
arithmetic as the quantizer, so an MSE-optimal step is optimal for the grid actually used.
"""

from __future__ import annotations

import torch

from mecqtk.quant.arith import fake_quantize
from mecqtk.quant.registry import register_observer

# Activations can be large; a fixed-size random sample per batch keeps calibration memory flat
# while still seeing every batch.
SAMPLES_PER_BATCH = 1 << 16


class Observer:
    """Collects statistics of a tensor; ``axis`` is the channel axis for per-channel steps."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [channels, values] (one row for a per-tensor observer)."""
        x = x.detach().float()
        if self.axis is None:
            return x.reshape(1, -1)
        return x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if self.axis is None and rows.shape[1] > SAMPLES_PER_BATCH:
            index = torch.randint(rows.shape[1], (SAMPLES_PER_BATCH,), generator=self._generator)
            rows = rows[:, index.to(rows.device)]
        self.samples.append(rows)

    def data(self) -> torch.Tensor:
        if not self.samples:
            raise RuntimeError("observer saw no data; run calibration batches first")
        return torch.cat(self.samples, dim=1)

    def compute_scale(self, qmin: int, qmax: int) -> torch.Tensor:
        raise NotImplementedError

    def compute_affine(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point of an asymmetric grid (LSQ+); from the range seen by default."""
        data = self.data()
        return affine_from_range(data.amin(dim=1), data.amax(dim=1), qmin, qmax)


def _bound(qmin: int, qmax: int) -> int:
    return max(-qmin, qmax)


MIN_STEP = 1e-8


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(MIN_STEP)


def affine_from_range(
    low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and integer zero point mapping ``[low, high]`` (widened to hold 0) onto the grid."""
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    scale = _safe((high - low) / (qmax - qmin))
    zero_point = torch.round(qmin - low / scale).clamp(qmin, qmax)
    return scale, zero_point


class MinMaxObserver(Observer):
    """Step so that the largest magnitude seen lands on the last code."""

    def compute_scale(self, qmin: int, qmax: int) -> torch.Tensor:
        return _safe(self.data().abs().amax(dim=1) / _bound(qmin, qmax))


class PercentileObserver(Observer):
    """Step from a high percentile of |x|: ignores rare outliers that min-max would chase."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99) -> None:
        super().__init__(axis)
        self.q = percentile / 100.0

    def compute_scale(self, qmin: int, qmax: int) -> torch.Tensor:
        data = self.data().abs()
        if data.shape[1] > 1 << 24:
            data = data[:, : 1 << 24]
        return _safe(torch.quantile(data, self.q, dim=1) / _bound(qmin, qmax))

    def compute_affine(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.data()[:, : 1 << 24]
        low = torch.quantile(data, 1.0 - self.q, dim=1)
        return affine_from_range(low, torch.quantile(data, self.q, dim=1), qmin, qmax)


class LSQInitObserver(Observer):
    """LSQ's own initialisation ``2 * mean|x| / sqrt(Qp)``."""

    def compute_scale(self, qmin: int, qmax: int) -> torch.Tensor:
        return _safe(2.0 * self.data().abs().mean(dim=1) / max(qmax, 1) ** 0.5)


class MSEObserver(Observer):
    """Step minimising the mean squared quantization error: a coarse grid over clip ratios of the
    largest magnitude, then a fine grid around the best coarse point (40 evaluations in all,
    about as precise as a 400-point grid)."""

    COARSE = 20
    FINE = 20
    # The search runs on an evenly strided subset of each row: the error curve of thousands of
    # values is already smooth, and large layers would otherwise dominate calibration time.
    SEARCH_VALUES = 4096

    def compute_scale(self, qmin: int, qmax: int) -> torch.Tensor:
        data = self.data()
        top = _safe(data.abs().amax(dim=1) / _bound(qmin, qmax))
        if data.shape[1] > self.SEARCH_VALUES:
            data = data[:, :: data.shape[1] // self.SEARCH_VALUES]
        best_err = torch.full_like(top, float("inf"))
        best_ratio = torch.ones_like(top)

        def search(ratios: torch.Tensor) -> None:
            nonlocal best_err, best_ratio
            for ratio in ratios:  # [channels] each
                candidate = _safe(top * ratio)
                err = (fake_quantize(data, candidate[:, None], qmin, qmax) - data).pow_(2)
                err = err.mean(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, ratio, best_ratio)

        coarse = torch.arange(self.COARSE, 0, -1, dtype=top.dtype) / self.COARSE
        search([torch.full_like(top, r.item()) for r in coarse])
        width = 1.0 / self.COARSE
        offsets = torch.linspace(-width, width, self.FINE + 2)[1:-1]
        search([(best_ratio + o).clamp(0.01, 1.0) for o in offsets])
        return _safe(top * best_ratio)

    def compute_affine(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The seen range shrunk by the ratio (coarse grid) that minimises the squared error."""
        data = self.data()
        if data.shape[1] > self.SEARCH_VALUES:
            data = data[:, :: data.shape[1] // self.SEARCH_VALUES]
        low, high = data.amin(dim=1), data.amax(dim=1)
        best = affine_from_range(low, high, qmin, qmax)
        best_err = torch.full_like(low, float("inf"))
        for step in range(self.COARSE * 2, 0, -1):
            ratio = step / (self.COARSE * 2)
            scale, zero_point = affine_from_range(low * ratio, high * ratio, qmin, qmax)
            quantized = fake_quantize(data, scale[:, None], qmin, qmax,
                                      zero_point=zero_point[:, None])
            err = (quantized - data).pow_(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]), torch.where(better, zero_point, best[1]))
        return best


register_observer("minmax", MinMaxObserver)
register_observer("percentile", PercentileObserver)
register_observer("mse", MSEObserver)
register_observer("lsq", LSQInitObserver)
