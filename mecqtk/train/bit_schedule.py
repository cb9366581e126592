"""A bit-width schedule: train wider first, then narrow to the recipe's bits.

Every quantizer narrower than ``start_bits`` computes on the ``start_bits`` grid for the first
``start_epochs`` of training, then switches to its own grid for the rest. At each switch the
switched step sizes are set afresh, by each quantizer's observer, from the weights and from the
current batch, as the first calibration set them: a 4-bit step is not a 2-bit one rescaled (the
best 2-bit clipping range is much narrower). The budget is the recipe's: the wide steps are
steps of the same run, not extra ones.

Only the quantizers' Python-side grid changes: the ``grid`` buffer that checkpoints carry stays
the recipe's, so a run interrupted in the wide phase resumes in it (the phase is saved).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mecqtk.quant.arith import integer_range
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer

NOT_STARTED, WIDE, NARROW = 0, 1, 2


class _Phase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("phase", torch.tensor(NOT_STARTED))


class BitSchedule:
    """A training term that adds nothing to the loss; :meth:`before_step` switches grids."""

    def __init__(self, start_bits: int, switch_step: int, qmodel: nn.Module) -> None:
        self.model = qmodel
        self.start_bits = start_bits
        self.switch_step = switch_step
        self.quantizers = [q for q in qmodel.modules()
                           if isinstance(q, FakeQuantizer) and q.bits < start_bits]
        self.own_bits = [q.bits for q in self.quantizers]
        self.weight_layers = [m for m in qmodel.modules() if isinstance(m, QuantizedLayer)
                              and any(m.weight_quantizer is q for q in self.quantizers)]
        self.trainable = _Phase()  # checkpoints keep the phase
        self.generator: torch.Generator | None = None  # draws nothing at random

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]:
        return {}

    @property
    def phase(self) -> int:
        return int(self.trainable.phase)

    def before_step(self, images: torch.Tensor, step: int) -> None:
        """Switch to the wide grids at the first step and back at ``switch_step``."""
        phase = self.phase
        if phase == NARROW:
            return
        if step >= self.switch_step:
            self._set_grids(wide=False)
            self._reinitialize(images)
            self.trainable.phase.fill_(NARROW)
        elif phase == NOT_STARTED:
            self._set_grids(wide=True)
            self._reinitialize(images)
            self.trainable.phase.fill_(WIDE)
        else:  # resumed in the wide phase: the checkpoint's steps are the wide ones
            self._set_grids(wide=True)

    def _set_grids(self, wide: bool) -> None:
        for quantizer, bits in zip(self.quantizers, self.own_bits, strict=True):
            quantizer.bits = self.start_bits if wide else bits
            quantizer.qmin, quantizer.qmax = integer_range(quantizer.bits, quantizer.signed)

    @torch.no_grad()
    def _reinitialize(self, images: torch.Tensor) -> None:
        """Fresh steps for the switched quantizers: weights from themselves, then activations
        from ``images`` through the model in eval mode (with the new weight grids), averaged
        over ranks so every process keeps the same model."""
        was_training = self.model.training
        self.model.eval()
        weight_quantizers = {id(layer.weight_quantizer) for layer in self.weight_layers}
        for layer in self.weight_layers:
            layer.weight_quantizer.start_observing()
            layer.weight_quantizer(layer.effective_weight())
            layer.weight_quantizer.finish_observing()
        activations = [q for q in self.quantizers if id(q) not in weight_quantizers]
        for quantizer in activations:
            quantizer.start_observing()
        try:
            self.model(images)
        finally:
            for quantizer in activations:
                quantizer.finish_observing()
            self.model.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for quantizer in activations:
                for tensor in (quantizer.scale.data, quantizer.step_floor, quantizer.previous_step):
                    dist.all_reduce(tensor)
                    tensor.div_(dist.get_world_size())
