"""Quantizers and observers by name: what recipe keys ``quantizer:`` and ``observer:`` select.

This module imports nothing of mecqtk: the built-in classes register themselves where they are
defined (:mod:`mecqtk.quant.quantizers`, :mod:`mecqtk.quant.observers`), and importing
:mod:`mecqtk.quant` (which any import of this module does first) loads both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

QUANTIZERS: dict[str, type] = {}
OBSERVERS: dict[str, type] = {}


def register_quantizer(name: str) -> Callable[[type[T]], type[T]]:
    def decorate(cls: type[T]) -> type[T]:
        QUANTIZERS[name] = cls
        return cls

    return decorate


def register_observer(name: str, cls: type) -> None:
    OBSERVERS[name] = cls

