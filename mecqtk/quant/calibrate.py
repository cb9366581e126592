"""Step-size initialisation from data, before training."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mecqtk.quant.bn_fold import BatchNorm, FoldedBNLayer
from mecqtk.quant.modules import QuantizedLayer, layer_weight_quantizers
from mecqtk.quant.quantizers import FakeQuantizer, Mode


def has_initial_statistics(bn: nn.Module) -> bool:
    """A BatchNorm whose running statistics are still the constructor's (mean 0, variance 1):
    a model built from timm's initialisation, not loaded from a trained checkpoint."""
    return (
        isinstance(bn, BatchNorm)
        and bn.running_mean is not None
        and bool((bn.running_mean == 0).all())
        and bool((bn.running_var == 1).all())
    )


@torch.no_grad()
def settle_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Estimate the running statistics of every BatchNorm that still has its initial ones, from
    ``batches`` run through the float path (every quantizer bypassed); returns how many.

    Why: calibration runs in eval mode, where BN normalises with its running statistics. At
    timm's initialisation those are mean 0 / variance 1, not the data's, so activations in
    eval mode are orders of magnitude off what the first training steps (batch statistics)
    produce: step sizes calibrated on them clip the training activations to a few codes near
    zero, the next BN divides by their tiny batch deviation, and the backward pass grows about
    tenfold per block (seen: 3e8 at mobilenetv3_small_100's stem, a step size of -6e5 after
    one SGD step, NaN at the second). Trained statistics from a checkpoint are left alone.
    (:func:`calibrate` of a model in training mode observes through the BatchNorms it settles
    with batch statistics, as training computes; the settled statistics serve eval mode.)
    """
    unsettled = [m for m in model.modules() if has_initial_statistics(m)]
    if not unsettled or not batches:
        return 0
    estimate_batchnorm_statistics(model, batches, unsettled, quantized=False)
    return len(unsettled)


@torch.no_grad()
def estimate_batchnorm_statistics(model: nn.Module, batches: Iterable[torch.Tensor],
                                  batchnorms: list[nn.Module], *, quantized: bool) -> int:
    """Replace the running statistics of ``batchnorms`` by their plain average over
    ``batches`` (model in training mode, no gradient); every other BatchNorm's statistics and
    every quantizer's state are left as they were. ``quantized`` runs the quantizers as they
    are (steps not tracked), otherwise the float path (every quantizer bypassed). Returns how
    many batches were seen."""
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    modes = [(q, q.mode, q.training) for q in quantizers]
    # statistics not estimated here also move in train mode: keep a copy to put back
    kept = [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
            for m in model.modules() if isinstance(m, BatchNorm) and m not in batchnorms]
    momenta = [bn.momentum for bn in batchnorms]
    was_training = model.training
    model.train()
    for quantizer in quantizers:
        quantizer.eval()  # a step that is not learned must not track these batches
        if not quantized:
            quantizer.mode = Mode.BYPASS
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches, not an EMA from the reset
    device = next(model.parameters()).device
    seen = 0
    try:
        for images in batches:
            model(images.to(device, non_blocking=True))
            seen += 1
    finally:
        for quantizer, mode, training in modes:
            quantizer.mode = mode
            quantizer.train(training)
        for bn, momentum in zip(batchnorms, momenta, strict=True):
            bn.momentum = momentum
        for bn, buffers in kept:
            for key, value in buffers.items():
                getattr(bn, key).copy_(value)
        model.train(was_training)
    return seen


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics with the model's final quantizers (a
    plain average over ``batches``, no gradient): during QAT the running averages mix
    statistics of step sizes and weights that have since moved, and at 2-4 bits eval mode is
    sensitive to that. BatchNorms whose statistics a recipe froze (folded, ``freeze_epoch``)
    keep them. Returns the number of batches seen.

    Example:
        >>> reestimate_batchnorm(qmodel, (x for x, _ in itertools.islice(loader, 200)))
        200
    """
    frozen = {id(m.bn) for m in model.modules() if isinstance(m, FoldedBNLayer) and m.frozen}
    batchnorms = [m for m in model.modules() if isinstance(m, BatchNorm)
                  and m.track_running_stats and m.running_mean is not None
                  and id(m) not in frozen]
    if not batchnorms:
        return 0
    return estimate_batchnorm_statistics(model, batches, batchnorms, quantized=True)


@contextmanager
def batch_statistics(batchnorms: list[nn.Module]) -> Iterator[None]:
    """Inside, ``batchnorms`` normalise with their batch statistics, as in training (the model
    around them may be in eval mode); on exit their running statistics and modes are put back."""
    kept = [(bn, bn.training, {k: v.clone() for k, v in bn.named_buffers(recurse=False)})
            for bn in batchnorms]
    try:
        for bn in batchnorms:
            bn.train()
        yield
    finally:
        for bn, training, buffers in kept:
            bn.train(training)
            for key, value in buffers.items():
                getattr(bn, key).copy_(value)


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

    BatchNorms that still have their initial running statistics (a model from timm's
    initialisation) first get them from the same batches (:func:`settle_batchnorm`), so the
    step sizes fit the activations training will see.

    Activation quantizers observe float activations (they pass values through while observing)
    computed with already-quantized weights. The model runs in eval mode, except that in a model
    in training mode (about to be trained) the BatchNorms just settled normalise with each batch's
    own statistics, as training will; their running statistics are not disturbed. Statistics
    settled from a few images are a poor stand-in for the batch's: on a 1x1 map two images give
    each channel one degree of freedom, and eval mode amplifies any difference from the settling
    pass (quantized weights, rounding) layer after layer. Calibrated in eval mode on 2 images,
    efficientnet_b0's activation steps past ``blocks.5.0`` came out 1e2 to 1e18 times what
    training computes: every code 0, constant logits, and an infinite gradient within two steps
    (``mecqtk doctor`` at 32 px). A model in eval mode (to be evaluated as it is, like the
    report's sensitivity subject) is calibrated on the settled statistics, and trained statistics
    (from a checkpoint) are always used as they are. ``observer`` overrides every quantizer's own
    observer, ``weight_observer`` (default: ``observer``) that of the weight quantizers. Returns
    the number of batches seen.

    Example:
        >>> calibrate(qmodel, (images for images, _ in itertools.islice(loader, 4)))
    """
    batches = list(batches)
    settled = [m for m in model.modules() if model.training and has_initial_statistics(m)]
    settle_batchnorm(model, batches)
    calibrate_weights(model, weight_observer or observer)
    # every quantizer not set from its layer's weight above observes the data: activation
    # quantizers, and those a graph puts on functional weights (they see the same weight)
    from_weights = {id(q) for q in layer_weight_quantizers(model).values()}
    observing = [m for m in model.modules()
                 if isinstance(m, FakeQuantizer) and id(m) not in from_weights]
    was_training = model.training
    model.eval()
    for quantizer in observing:
        quantizer.start_observing(observer)
    seen = 0
    device = next(model.parameters()).device
    with batch_statistics(settled):
        for images in batches:
            model(images.to(device, non_blocking=True))
            seen += 1
    if seen == 0:
        raise ValueError("calibration needs at least one batch")
    for quantizer in observing:
        quantizer.finish_observing()
    model.train(was_training)
    return seen
