"""The frozen full-precision teacher: one forward per training step, shared by MEC and KD."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from mecqtk.graph.pipeline import trace_float
from mecqtk.recipe.schema import QuantConfig


class Teacher:
    """A frozen copy of the float model, traced so features can be tapped by node name.

    ``config`` is the recipe's ``quant`` section: the teacher is traced with the leaf handling
    the student was prepared with (:func:`~mecqtk.graph.pipeline.trace_float`), so every model
    prepare handles has a teacher, and its nodes carry the student's names.
    """

    def __init__(self, model: nn.Module, config: QuantConfig | None = None) -> None:
        self.graph: fx.GraphModule = trace_float(model, config or QuantConfig())
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
