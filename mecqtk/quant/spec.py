"""A resolved quantization decision for one tensor (what the annotate pass writes on a node)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mecqtk.quant.arith import integer_range


@dataclass(frozen=True)
class QuantSpec:
    """Everything needed to build the fake-quantizer of one tensor, with no "auto" left in it."""

    bits: int
    signed: bool
    quantizer: str = "lsq"
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    observer: str = "mse"
    learn_step: bool = True

    @property
    def qrange(self) -> tuple[int, int]:
        return integer_range(self.bits, self.signed)

    def describe(self) -> str:
        sign = "s" if self.signed else "u"
        gran = "ch" if self.granularity == "per_channel" else "t"
        return f"{sign}{self.bits} {self.quantizer}/{gran}"
