"""Concrete values of every FX node at two batch sizes, so the exporter can tell which dimensions
follow the batch (and become dynamic in ONNX) from those that are fixed by the architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

BATCH_SIZES = (2, 3)


@dataclass(frozen=True)
class ValueInfo:
    """What a node produced: a tensor's shape and dtype, or a plain Python value (ints, tuples)."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    value: Any = None

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    @property
    def rank(self) -> int:
        assert self.shape is not None
        return len(self.shape)


def _describe(result: Any) -> ValueInfo:
    if isinstance(result, torch.Tensor):
        return ValueInfo(tuple(result.shape), result.dtype)
    if isinstance(result, torch.Size):
        return ValueInfo(None, None, tuple(result))
    return ValueInfo(None, None, result)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: dict[str, ValueInfo] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.seen[n.name] = _describe(result)
        return result


@dataclass
class GraphValues:
    """Per node, what it produced at the first and second batch size."""

    first: dict[str, ValueInfo]
    second: dict[str, ValueInfo]

    def info(self, node: fx.Node) -> ValueInfo:
        return self.first[node.name]

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        info = self.first[node.name]
        if info.shape is None:
            raise TypeError(f"{node.name} is not a tensor")
        return info.shape

    def dynamic_shape(self, node: fx.Node) -> list[int | None]:
        """The node's shape with None where the dimension changes with the batch size."""
        a, b = self.first[node.name].shape, self.second[node.name].shape
        assert a is not None and b is not None
        return [x if x == y else None for x, y in zip(a, b, strict=True)]

    def follows_batch(self, node: fx.Node) -> bool:
        """True for a Python value (like ``x.size(0)``) that differs between the batch sizes."""
        return self.first[node.name].value != self.second[node.name].value


@torch.no_grad()
def record_values(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> GraphValues:
    """Run ``gm`` on random inputs of ``input_shape`` (without batch) at two batch sizes."""
    runs = []
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    for batch in BATCH_SIZES:
        recorder = _Recorder(gm)
        recorder.run(torch.randn(batch, *input_shape, device=device))
        runs.append(recorder.seen)
    return GraphValues(*runs)
