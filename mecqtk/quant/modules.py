"""Quantized layers: a Conv or Linear kept intact, with a fake-quantizer on the weight it uses."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from mecqtk.quant.layer_forms import WeightInterceptor, layer_form, uses_raw_weight
from mecqtk.quant.quantizers import FakeQuantizer

QUANTIZABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

LayerKind = Literal["conv", "linear"]


def is_quantizable_layer(module: nn.Module) -> bool:
    """Conv1d/2d/3d (any subclass: depthwise, grouped, timm's Conv2dSame, StdConv2d) or Linear."""
    return isinstance(module, QUANTIZABLE_TYPES)


class QuantizedLayer(nn.Module):
    """``layer`` computing with its fake-quantized (effective) weight.

    The original module is kept (``self.layer``) so parameter names and any subclass behaviour
    survive; only the weight it multiplies with is replaced: for weight-standardised convs that
    is the standardised weight (see :mod:`mecqtk.quant.layer_forms`). ``input_quantizer`` is set
    only for layers inside code the tracer could not see (a leaf module's own forward), where no
    graph node can carry the input quantizer. Attributes the layer has and this wrapper does not
    (``out_channels``, ``weight``) are read through, so code that inspects the layer still works.
    """

    # set by the convert stage (mecqtk.export.deploy_eval): in eval mode the layer computes its
    # deploy form, bit for bit what the exported file computes
    deploy_form: Any = None

    def __init__(self, layer: nn.Module, weight_quantizer: FakeQuantizer,
                 input_quantizer: FakeQuantizer | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)

    def effective_weight(self) -> torch.Tensor:
        """The float weight the layer really multiplies with (before quantization)."""
        form = layer_form(self.layer)
        return self.layer.weight if form is None else form.effective_weight(self.layer)

    def weight_gain(self) -> torch.Tensor | None:
        """``g`` with ``effective_weight() == layer.weight * g`` (broadcasting), or None where the
        effective weight is no such multiple of the parameter (weight standardisation)."""
        return torch.ones((), device=self.layer.weight.device) if uses_raw_weight(self.layer) \
            else None

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.effective_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy_form is not None and self.deploy_form.active():
            return self.deploy_form(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        form = layer_form(self.layer)
        if form is not None:
            weight = self.weight_quantizer(form.effective_weight(self.layer))
            return form.apply(self.layer, x, weight, self.layer.bias)
        with WeightInterceptor(self.weight_quantizer):
            return self.layer(x)


def is_layer(module: nn.Module) -> bool:
    """A quantizable layer, float or already wrapped in a :class:`QuantizedLayer`."""
    return is_quantizable_layer(module) or isinstance(module, QuantizedLayer)


def holds_layers(module: nn.Module) -> bool:
    """Whether ``module`` is or contains a quantizable Conv/Linear."""
    return any(is_quantizable_layer(m) for m in module.modules())


def layer_kind(module: nn.Module) -> LayerKind | None:
    """``linear`` or ``conv`` for a (possibly wrapped) quantizable layer, None for anything else."""
    if isinstance(module, QuantizedLayer):
        module = module.layer
    if not is_quantizable_layer(module):
        return None
    return "linear" if isinstance(module, nn.Linear) else "conv"


def layer_weight_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """The weight quantizer of every :class:`QuantizedLayer` in ``model``, by qualified name.

    (Weights passed to a functional ``F.linear`` are quantized by graph nodes instead: see
    :func:`mecqtk.graph.introspect.weight_quantizers`.)
    """
    return {f"{name}.weight_quantizer" if name else "weight_quantizer": m.weight_quantizer
            for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
