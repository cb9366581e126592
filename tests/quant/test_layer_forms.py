"""The quantized weight is the weight the layer really uses (timm conv subclasses included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

from mecqtk.quant.layer_forms import layer_form
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import Mode, make_quantizer
from mecqtk.quant.spec import QuantSpec

SPEC = QuantSpec(bits=3, signed=True, granularity="per_channel")


def _wrap(layer: nn.Module) -> QuantizedLayer:
    quantizer = make_quantizer(SPEC, channels=layer.weight.shape[0], axis=0)
    wrapped = QuantizedLayer(layer, quantizer)
    quantizer.start_observing()
    quantizer(wrapped.effective_weight())
    quantizer.finish_observing()
    return wrapped


LAYERS = [
    lambda: nn.Conv1d(4, 6, 3, padding=1),
    lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4),  # grouped
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
    lambda: nn.Conv3d(4, 6, 3, padding=1),
    lambda: nn.Linear(4, 6),
    lambda: Conv2dSame(4, 6, 3, stride=2),
    lambda: StdConv2d(4, 6, 3),
    lambda: StdConv2dSame(4, 6, 3, stride=2),
    lambda: ScaledStdConv2d(4, 6, 3),
    lambda: ScaledStdConv2dSame(4, 6, 3, stride=2),
]
INPUTS = {nn.Conv1d: (2, 4, 9), nn.Conv3d: (2, 4, 5, 5, 5), nn.Linear: (2, 4)}


@pytest.mark.parametrize("make", LAYERS)
def test_bypass_equals_the_layer_and_quantized_weight_is_on_the_grid(make):
    torch.manual_seed(0)
    layer = make()
    if isinstance(layer, ScaledStdConv2d | ScaledStdConv2dSame):
        nn.init.uniform_(layer.gain, 0.5, 2.0)
    x = torch.randn(*INPUTS.get(type(layer), (2, 4, 9, 9)))
    wrapped = _wrap(layer)
    wrapped.weight_quantizer.mode = Mode.BYPASS
    torch.testing.assert_close(wrapped(x), layer(x), atol=1e-5, rtol=1e-5)
    wrapped.weight_quantizer.mode = Mode.QUANTIZE
    weight = wrapped.quantized_weight()
    codes = weight / wrapped.weight_quantizer.broadcast(wrapped.weight_quantizer.scale, weight)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.round().min() >= -4 and codes.round().max() <= 3
    # the layer's output uses exactly that weight
    assert layer_form(layer) is not None
    expected = layer_form(layer).apply(layer, x, weight, layer.bias)
    torch.testing.assert_close(wrapped(x), expected)


def test_standardised_conv_quantizes_the_standardised_weight():
    torch.manual_seed(0)
    layer = StdConv2d(4, 6, 3)
    with torch.no_grad():
        layer.weight.mul_(5.0).add_(3.0)  # far from standardised: raw != effective
    wrapped = _wrap(layer)
    effective = wrapped.effective_weight()
    flat = effective.reshape(6, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x, wrapped.quantized_weight(), None, 1, layer.padding)
    torch.testing.assert_close(wrapped(x), expected)


class DoubledConv(nn.Conv2d):
    """An unknown subclass: convolves with a weight computed in its own forward."""

    def forward(self, x):
        return F.conv2d(x, self.weight * 2.0, self.bias, self.stride, self.padding)


def test_unknown_subclass_weight_is_intercepted_at_the_conv_call():
    torch.manual_seed(0)
    layer = DoubledConv(3, 5, 3, padding=1)
    assert layer_form(layer) is None
    quantizer = make_quantizer(SPEC, channels=5, axis=0)
    with torch.no_grad():
        quantizer.scale.fill_(0.05)
    wrapped = QuantizedLayer(layer, quantizer)
    x = torch.randn(2, 3, 6, 6)
    expected = F.conv2d(x, quantizer(layer.weight * 2.0), layer.bias, 1, 1)
    torch.testing.assert_close(wrapped(x), expected)
    wrapped(x).sum().backward()
    assert quantizer.scale.grad is not None and layer.weight.grad is not None


def test_wrapper_reads_layer_attributes_through():
    wrapped = _wrap(nn.Conv2d(3, 5, 3))
    assert wrapped.out_channels == 5 and wrapped.weight is wrapped.layer.weight
