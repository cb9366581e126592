"""Error and code-usage measures, accumulated batch by batch so N images never sit in memory.

All sums are kept in float64: the energy of an activation tensor over a few hundred images easily
exceeds what float32 adds up exactly, and SQNR is a ratio of two such sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ErrorStats:
    """Running energies of a reference tensor, a test tensor and their difference.

    Example:
        >>> stats = ErrorStats()
        >>> stats.update(torch.tensor([1.0, -1.0]), torch.tensor([1.0, -0.5]))
        >>> round(stats.sqnr_db(), 2)
        9.03
    """

    signal: float = 0.0  # sum of reference**2
    noise: float = 0.0  # sum of (test - reference)**2
    test: float = 0.0  # sum of test**2
    dot: float = 0.0  # sum of reference * test
    count: int = 0

    @torch.no_grad()
    def update(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        ref = reference.detach().double()
        out = test.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((out - ref).pow(2).sum())
        self.test += float(out.pow(2).sum())
        self.dot += float((ref * out).sum())
        self.count += ref.numel()

    def sqnr_db(self) -> float:
        """10 log10(signal energy / error energy); inf when the error is exactly zero."""
        if self.count == 0 or self.signal == 0.0:
            return math.nan
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def mse(self) -> float:
        return self.noise / self.count if self.count else math.nan

    def cosine(self) -> float:
        denominator = math.sqrt(self.signal * self.test)
        return self.dot / denominator if denominator > 0 else math.nan


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB.

    Example:
        >>> round(sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])), 1)
        20.0
    """
    stats = ErrorStats()
    stats.update(reference, test)
    return stats.sqnr_db()


@torch.no_grad()
def unclamped_codes(x: torch.Tensor, step: torch.Tensor,
                    zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``round(x / step) + zero_point`` before saturation (float), as QuantizeLinear rounds it.

    ``step`` and ``zero_point`` must already broadcast against ``x``.
    """
    codes = torch.round(x / step)
    return codes if zero_point is None else codes + zero_point


@dataclass
class LevelStats:
    """How an integer grid [qmin, qmax] is used: code histogram and saturated values.

    Example:
        >>> levels = LevelStats(qmin=-2, qmax=1)
        >>> levels.update(torch.tensor([0.0, 1.0, 1.0, -2.0, 5.0]))
        >>> levels.used(), levels.histogram, levels.clip_ratio()
        (3, [1, 0, 1, 3], 0.2)
    """

    qmin: int
    qmax: int
    histogram: list[int] = field(default_factory=list)
    clipped: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.histogram:
            self.histogram = [0] * (self.qmax - self.qmin + 1)

    @property
    def total(self) -> int:
        """Number of levels the grid offers (2^bits)."""
        return self.qmax - self.qmin + 1

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Add unsaturated codes (:func:`unclamped_codes`); out-of-range ones count as clipped."""
        flat = codes.detach().reshape(-1)
        self.clipped += int(((flat < self.qmin) | (flat > self.qmax)).sum())
        index = flat.clamp(self.qmin, self.qmax).to(torch.int64) - self.qmin
        counts = torch.bincount(index.cpu(), minlength=self.total)
        self.histogram = [a + int(b) for a, b in zip(self.histogram, counts.tolist(), strict=True)]
        self.count += flat.numel()

    def used(self) -> int:
        return sum(1 for c in self.histogram if c > 0)

    def entropy_bits(self) -> float:
        return entropy_bits(self.histogram)

    def clip_ratio(self) -> float:
        return self.clipped / self.count if self.count else math.nan


def entropy_bits(histogram: list[int]) -> float:
    """Shannon entropy (bits) of the distribution a histogram of counts describes.

    Example:
        >>> entropy_bits([1, 0, 1, 2])
        1.5
    """
    total = sum(histogram)
    if total == 0:
        return math.nan
    return -sum(c / total * math.log2(c / total) for c in histogram if c > 0) + 0.0


@dataclass
class ValueSample:
    """A bounded random sample of the values a tensor took, for the histograms.

    Each update contributes up to ``per_update`` values drawn uniformly (with replacement)
    until ``capacity`` values are kept, so the first batches are the ones sampled.
    """

    capacity: int = 20_000
    seed: int = 0
    chunks: list[torch.Tensor] = field(default_factory=list)
    size: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)

    @torch.no_grad()
    def update(self, x: torch.Tensor, per_update: int = 4096) -> None:
        if self.size >= self.capacity or x.numel() == 0:
            return
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        flat = x.detach().reshape(-1)
        take = min(per_update, self.capacity - self.size)
        index = torch.randint(flat.numel(), (take,), generator=self.generator)
        self.chunks.append(flat[index.to(flat.device)].float().cpu())
        self.size += take

    def values(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0)
