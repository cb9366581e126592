"""What a quantize run starts from: the float model, built to meet the images, and the data.

Small in-memory images (CIFAR) are met by building the model at their size (``img_size``) or by
resizing them (see :mod:`mecqtk.models.input_fit`); large images stream from disk through timm's
transforms at the model's own size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mecqtk.data import DataBundle, build_data, peek_image_size, peek_num_classes
from mecqtk.errors import ModelError
from mecqtk.models import (
    InputFit,
    create_model,
    fit_at_own_size,
    fit_model_to_images,
    is_external,
    require_known_model,
)


@dataclass
class RunInputs:
    """The float model and the data of a run, and what run.json records about them."""

    float_model: nn.Module
    data: DataBundle
    num_classes: int
    class_names: list[str]
    # extra timm constructor arguments the model was built with ({"img_size": 32})
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def fit_input(model: str, data: str, num_classes: int,
              say: Callable[[str], None]) -> InputFit | None:
    """How the model meets small in-memory images: as they are, built at their size
    (``img_size``) or with the images resized. None for large images: they stream from disk
    through timm's transforms at the model's own size."""
    require_known_model(model)
    image_size = peek_image_size(data)
    if image_size is None or is_external(model):
        return None  # Hub models: built as they come, trying sizes would download them
    fit = fit_model_to_images(model, num_classes, image_size)
    if fit.how != "native":  # the common case goes without saying
        say(fit.describe(model, image_size))
    return fit


def build_run_inputs(model: str, data: str, *, checkpoint: str | None, pretrained: bool,
                     batch_size: int, eval_batch_size: int, limit_train: int | None,
                     limit_val: int | None, seed: int, workers: int, distributed: bool,
                     say: Callable[[str], None]) -> RunInputs:
    """Build the float model for the images of ``data`` and the loaders (``batch_size`` is
    per process).

    Example:
        >>> inputs = build_run_inputs("cifar_resnet20", "imagefolder:../shared/data/cifar10-jpeg",
        ...     checkpoint=None, pretrained=False, batch_size=128, eval_batch_size=256,
        ...     limit_train=None, limit_val=None, seed=0, workers=0, distributed=False, say=print)
    """
    num_classes, class_names = peek_num_classes(data)
    fit = fit_input(model, data, num_classes, say)
    model_kwargs = fit.model_kwargs if fit is not None else {}
    try:
        float_model = create_model(model, num_classes=num_classes, pretrained=pretrained,
                                   checkpoint=checkpoint, **model_kwargs)
    except ModelError:
        if not model_kwargs or checkpoint is None:
            raise
        # weights made at the model's own size (position embeddings for 224 px) do not
        # fit the model built for the images: resize the images instead
        fit = fit_at_own_size(model, num_classes)
        say(f"{checkpoint} fits {model} at its own size only; "
            f"images are resized to {fit.input_size[1]}x{fit.input_size[2]}")
        model_kwargs = {}
        float_model = create_model(model, num_classes=num_classes, pretrained=pretrained,
                                   checkpoint=checkpoint)
    bundle = build_data(
        data, model=float_model, batch_size=batch_size, eval_batch_size=eval_batch_size,
        limit_train=limit_train, limit_val=limit_val, seed=seed, num_workers=workers,
        distributed=distributed, input_size=fit.input_size if fit is not None else None,
    )
    return RunInputs(float_model, bundle, num_classes, class_names, model_kwargs)
