"""Quantized layers: a Conv or Linear kept intact, with a fake-quantizer on its weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mecqtk.quant.quantizers import FakeQuantizer

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_quantizable_layer(module: nn.Module) -> bool:
    return isinstance(module, (*_PLAIN_CONVS, nn.Linear))


class QuantizedLayer(nn.Module):
    """``layer`` computing with fake-quantized weights.

    The original module is kept (``self.layer``) so any subclass keeps its own forward (timm's
    Conv2dSame padding, for example); only the weight it sees is replaced.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: FakeQuantizer) -> None:
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        layer = self.layer
        if type(layer) in _PLAIN_CONVS:
            return layer._conv_forward(x, weight, layer.bias)
        if type(layer) is nn.Linear:
            return F.linear(x, weight, layer.bias)
        return torch.func.functional_call(layer, {"weight": weight}, (x,))
