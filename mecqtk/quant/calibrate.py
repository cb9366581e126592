"""Step-size initialisation from data, before training."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mecqtk.quant.modules import QuantizedLayer
from mecqtk.quant.quantizers import FakeQuantizer


@torch.no_grad()
def calibrate_weights(model: nn.Module, observer: str | None = None) -> None:
    """Initialise every weight quantizer from the (effective) weight it quantizes.

    ``observer`` overrides each quantizer's own observer (``minmax`` for a quick check).
    """
    for layer in model.modules():
        if isinstance(layer, QuantizedLayer):
            quantizer = layer.weight_quantizer
            quantizer.start_observing(observer)
            quantizer(layer.effective_weight())
            quantizer.finish_observing()


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    observer: str | None = None,
    weight_observer: str | None = None,
) -> int:
    """Initialise all step sizes: weights from themselves, activations from ``batches``.

    Activation quantizers observe float activations (they pass values through while observing)
    computed with already-quantized weights. The model runs in eval mode so BatchNorm statistics
    are not disturbed. ``observer`` overrides every quantizer's own observer, ``weight_observer``
    (default: ``observer``) that of the weight quantizers. Returns the number of batches seen.

    Example:
        >>> calibrate(qmodel, (images for images, _ in itertools.islice(loader, 4)))
    """
    calibrate_weights(model, weight_observer or observer)
    weight_quantizers = {id(m.weight_quantizer) for m in model.modules()
                         if isinstance(m, QuantizedLayer)}
    activation = [m for m in model.modules()
                  if isinstance(m, FakeQuantizer) and id(m) not in weight_quantizers]
    was_training = model.training
    model.eval()
    for quantizer in activation:
        quantizer.start_observing(observer)
    seen = 0
    device = next(model.parameters()).device
    for images in batches:
        model(images.to(device, non_blocking=True))
        seen += 1
    if seen == 0:
        raise ValueError("calibration needs at least one batch")
    for quantizer in activation:
        quantizer.finish_observing()
    model.train(was_training)
    return seen
