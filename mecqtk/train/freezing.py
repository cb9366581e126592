"""Oscillation freezing (Nagel et al., "Overcoming oscillations in quantization-aware training",
ICML 2022, section 4.2).

At 2-3 bits the straight-through gradient makes a latent weight near a bin edge flip between two
codes on successive steps: the quantized network keeps changing although nothing is learnt, and
BatchNorm statistics gathered over those steps fit neither state. After every optimizer update
this tracks, per quantized weight, an exponential moving average of its oscillation frequency
(an oscillation is a code change in the direction opposite to the weight's previous change) and
of its code. A weight whose frequency passes the threshold is frozen for the rest of training:
its latent value is set to the centre of the bin of its average code, and every later update of
it is undone. Weights of layers whose effective weight is not a per-channel multiple of the
parameter (weight standardisation) and channels whose folded BatchNorm gain is near zero are
never frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from mecqtk.quant.modules import QuantizedLayer

# the moving averages' momentum: each step weighs 1 % (the paper's m = 0.01)
MOMENTUM = 0.01
_MIN_GAIN = 1e-6


class _LayerState(nn.Module):
    """The freezing state of one layer's weight: buffers, so checkpoints keep it."""

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.clone())
        self.register_buffer("direction", torch.zeros_like(codes))
        self.register_buffer("frequency", torch.zeros_like(codes))
        self.register_buffer("average_code", codes.clone())
        self.register_buffer("frozen", torch.zeros_like(codes, dtype=torch.bool))
        self.register_buffer("frozen_value", torch.zeros_like(codes))


class OscillationFreezer:
    """A training term that adds nothing to the loss: it logs the frozen fraction, and its
    :meth:`after_update` (called after every optimizer step) tracks and freezes weights."""

    def __init__(self, threshold: float, qmodel: nn.Module) -> None:
        self.threshold = threshold
        self.layers = [m for m in qmodel.modules()
                       if isinstance(m, QuantizedLayer) and m.weight_gain() is not None
                       and m.weight_quantizer.zero_point() is None]
        with torch.no_grad():
            states = [_LayerState(self._codes(layer)) for layer in self.layers]
        self.trainable = nn.ModuleList(states)  # no parameters: checkpoints keep the buffers
        self.generator: torch.Generator | None = None  # draws nothing at random

    @staticmethod
    def _codes(layer: QuantizedLayer) -> torch.Tensor:
        return layer.weight_quantizer.codes(layer.effective_weight()).float()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]:
        frozen = sum(state.frozen.sum() for state in self.trainable)
        total = sum(state.frozen.numel() for state in self.trainable)
        return {"log_frozen_weight_fraction": torch.as_tensor(frozen, dtype=torch.float32)
                / max(total, 1)}

    @torch.no_grad()
    def after_update(self) -> None:
        """Update the averages with the new codes, freeze the weights that oscillate too often,
        and put every frozen weight back on its frozen value. No host sync."""
        for layer, state in zip(self.layers, self.trainable, strict=True):
            codes = self._codes(layer)
            change = torch.sign(codes - state.codes)
            oscillated = (change != 0) & (change == -state.direction)
            state.direction.copy_(torch.where(change != 0, change, state.direction))
            state.codes.copy_(codes)
            state.frequency.mul_(1 - MOMENTUM).add_(MOMENTUM * oscillated.float())
            state.average_code.mul_(1 - MOMENTUM).add_(MOMENTUM * codes)
            gain = layer.weight_gain()
            assert gain is not None
            gain = gain.expand_as(codes)
            quantizer = layer.weight_quantizer
            step = quantizer.broadcast(quantizer.step_size(), codes).expand_as(codes)
            target = state.average_code.round().clamp(quantizer.qmin, quantizer.qmax)
            freeze = (state.frequency > self.threshold) & ~state.frozen & (gain.abs() > _MIN_GAIN)
            state.frozen_value.copy_(torch.where(
                freeze, target * step / torch.where(freeze, gain, 1.0), state.frozen_value))
            state.frozen.logical_or_(freeze)
            weight = layer.layer.weight
            weight.copy_(torch.where(state.frozen, state.frozen_value.to(weight), weight))
