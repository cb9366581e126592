"""The frozen full-precision teacher: one forward per training step, shared by MEC and KD."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from mecqtk.graph.tracer import trace


class Teacher:
    """A frozen copy of the float model, traced so features can be tapped by node name."""

    def __init__(self, model: nn.Module, extra_leaf_classes: tuple[str, ...] = ()) -> None:
        self.graph: fx.GraphModule = trace(copy.deepcopy(model), extra_leaf_classes)
        self.graph.eval()
        for param in self.graph.parameters():
            param.requires_grad_(False)
        self._last_input: torch.Tensor | None = None
        self._last_output: torch.Tensor | None = None

    def to(self, device: torch.device) -> Teacher:
        self.graph.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for ``images``; a second call with the same batch object reuses them."""
        if images is not self._last_input:
            self._last_output = self.graph(images)
            self._last_input = images
        assert self._last_output is not None
        return self._last_output
