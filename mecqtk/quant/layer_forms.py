"""How each Conv/Linear class really uses its weight, so the quantizer sees that weight.

A weight-standardised conv (timm's StdConv2d, ScaledStdConv2d) convolves with a standardised copy
of ``self.weight``; quantizing the raw weight would put the standardised one off the integer grid.
Each :class:`LayerForm` splits a layer into the weight it really multiplies with
(``effective_weight``) and the computation around it (``apply``: padding, the conv/linear itself),
so ``apply(layer, x, effective_weight(layer), layer.bias)`` equals ``layer(x)``.

Classes not in the table that do not override ``forward`` use their base class's form. Other
subclasses get no form: :class:`~mecqtk.quant.modules.QuantizedLayer` then intercepts the weight
at the ``F.conv*``/``F.linear`` call of their forward instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.linear import Linear as TimmLinear
from timm.layers.padding import pad_same
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerForm:
    effective_weight: Callable[[nn.Module], Tensor]
    # apply(layer, x, weight, bias): the layer's computation with the given weight and bias
    apply: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]


def _raw_weight(layer: nn.Module) -> Tensor:
    return layer.weight


def _standardised(layer: nn.Module) -> Tensor:
    """timm's weight standardisation: batch-norm statistics over each output channel's fan-in."""
    gain = getattr(layer, "gain", None)
    scale = getattr(layer, "scale", None)
    weight = None if gain is None else (gain * scale).view(-1)
    flat = layer.weight.reshape(1, layer.out_channels, -1)
    return F.batch_norm(
        flat, None, None, weight=weight, training=True, momentum=0.0, eps=layer.eps
    ).reshape_as(layer.weight)


def _conv(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return layer._conv_forward(x, weight, bias)


def _linear(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _same_padded_conv(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """TF 'SAME' padding computed from the input size, then the conv (timm's conv2d_same)."""
    if getattr(layer, "same_pad", True):
        x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


PLAIN_CONV = LayerForm(_raw_weight, _conv)
PLAIN_LINEAR = LayerForm(_raw_weight, _linear)


# a module-level table, not a cached function: the lookup runs inside every quantized layer's
# forward, which torch.compile traces
_TABLE: dict[type, LayerForm] = {
    nn.Conv1d: PLAIN_CONV,
    nn.Conv2d: PLAIN_CONV,
    nn.Conv3d: PLAIN_CONV,
    nn.Linear: PLAIN_LINEAR,
    TimmLinear: PLAIN_LINEAR,  # casts only under TorchScript
    Conv2dSame: LayerForm(_raw_weight, _same_padded_conv),
    Conv2dSameExport: LayerForm(_raw_weight, _same_padded_conv),
    StdConv2d: LayerForm(_standardised, _conv),
    ScaledStdConv2d: LayerForm(_standardised, _conv),
    StdConv2dSame: LayerForm(_standardised, _same_padded_conv),
    ScaledStdConv2dSame: LayerForm(_standardised, _same_padded_conv),
}


def uses_raw_weight(layer: nn.Module) -> bool:
    """Whether ``layer`` multiplies with its ``weight`` parameter as it is (no standardisation)."""
    form = layer_form(layer)
    return form is None or form.effective_weight is _raw_weight


def layer_form(layer: nn.Module) -> LayerForm | None:
    """The form of ``layer``'s class, or None when a subclass computes something unknown."""
    table = _TABLE
    if type(layer) in table:
        return table[type(layer)]
    for base in type(layer).__mro__[1:]:
        if base in table and type(layer).forward is base.forward:
            return table[base]
    return None


class WeightInterceptor(torch.overrides.TorchFunctionMode):
    """Replaces the weight argument of the first conv/linear call made while active.

    Used for layer subclasses without a :class:`LayerForm`: whatever weight their forward computes
    and passes to ``F.conv2d``/``F.linear`` is what gets quantized.
    """

    CALLS: ClassVar = {
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.linear,
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
    }

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.transform = transform
        self.seen: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CALLS and self.seen is None:
            args = list(args)
            if len(args) > 1:
                self.seen = args[1]
                args[1] = self.transform(args[1])
            elif "weight" in kwargs:
                self.seen = kwargs["weight"]
                kwargs = {**kwargs, "weight": self.transform(kwargs["weight"])}
        return func(*args, **kwargs)
