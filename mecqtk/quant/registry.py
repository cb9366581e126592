"""Quantizers and observers by name: what recipe keys ``quantizer:`` and ``observer:`` select."""

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


def _register_builtin() -> None:
    from mecqtk.quant import observers

    register_observer("minmax", observers.MinMaxObserver)
    register_observer("percentile", observers.PercentileObserver)
    register_observer("mse", observers.MSEObserver)
    register_observer("lsq", observers.LSQInitObserver)
    import mecqtk.quant.quantizers  # noqa: F401  (registers quantizers by decorator)


_register_builtin()
