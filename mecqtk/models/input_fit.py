"""Fitting a model and small images to each other: run the model at the images' size, build it at
that size (timm's ``img_size``), or resize the images to the model's size.

Convolutional nets with global pooling run at any size, so CIFAR's 32-px images go in as they
are. Fixed-input-size models (ViT, DeiT, Swin, Mixer, LeViT, ...) are built for one size; where
timm accepts ``img_size=`` they are built at the images' size (position embeddings, windows and
attention biases follow it). Where even that fails (EfficientFormer's 7x7 attention biases,
Inception's stem that needs 75 px) the images are upsampled to the model's own size with the
interpolation of its timm config. Every choice is checked by running the model once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
from torch import nn

from mecqtk.errors import ModelError

How = Literal["native", "img_size", "resize"]


@dataclass(frozen=True)
class InputFit:
    """How a model meets the images.

    Attributes:
        how: ``native`` (the model runs at the images' size), ``img_size`` (built at the images'
            size) or ``resize`` (images resized to ``input_size``).
        input_size: (C, H, W) the model gets.
        model_kwargs: Extra ``create_model`` keyword arguments (``{"img_size": 32}``).
        interpolation: How images are resized when ``how == "resize"`` (timm's config).
    """

    how: How
    input_size: tuple[int, int, int]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    interpolation: str = "bicubic"

    def describe(self, model: str, image_size: tuple[int, int, int]) -> str:
        """One log line saying what was done."""
        side = "x".join(str(s) for s in image_size[1:])
        target = "x".join(str(s) for s in self.input_size[1:])
        if self.how == "native":
            return f"{model} runs on the {side} images as they are"
        if self.how == "img_size":
            return (f"{model} is fixed-size; built at the images' size "
                    f"(img_size={self.model_kwargs['img_size']})")
        return (f"{model} runs on {side} images only at its own size; images are resized to "
                f"{target} ({self.interpolation}), which costs compute")


def fit_model_to_images(name: str, num_classes: int,
                        image_size: tuple[int, int, int]) -> InputFit:
    """Decide how ``name`` runs on images of ``image_size`` (C, H, W), by trying each way once
    on a randomly initialised copy.

    Raises:
        ModelError: The model runs neither at that size, nor built for it, nor at its own
            configured size.

    Example:
        >>> fit_model_to_images("vit_tiny_patch16_224", 10, (3, 32, 32)).model_kwargs
        {'img_size': 32}
    """
    height, width = image_size[1:]
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    failure = _failure_at(model, image_size)
    if failure is None:
        return InputFit("native", image_size)
    img_size: Any = height if height == width else (height, width)
    try:
        sized = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                  img_size=img_size)
    except Exception:  # timm raises TypeError, AssertionError, ... for an unknown keyword
        sized = None
    if sized is not None and _failure_at(sized, image_size) is None:
        return InputFit("img_size", image_size, {"img_size": img_size})
    resized = _resize_fit(model)
    if resized.input_size != tuple(image_size) and _failure_at(model, resized.input_size) is None:
        return resized
    own_size = resized.input_size
    raise ModelError(
        f"{name} does not run on {height}x{width} images ({failure}), and neither built for "
        f"that size nor at its own size {own_size[1]}x{own_size[2]}; pick another model"
    )


def fit_at_own_size(name: str, num_classes: int) -> InputFit:
    """Resize the images to the model's configured size (for weights made at that size).

    Example:
        >>> fit_at_own_size("vit_tiny_patch16_224", 10).input_size
        (3, 224, 224)
    """
    return _resize_fit(timm.create_model(name, pretrained=False, num_classes=num_classes))


def _resize_fit(model: nn.Module) -> InputFit:
    config = model.pretrained_cfg
    own = tuple(config.get("input_size", (3, 224, 224)))
    return InputFit("resize", (int(own[0]), int(own[1]), int(own[2])),
                    interpolation=config.get("interpolation") or "bicubic")


@torch.no_grad()
def _failure_at(model: nn.Module, size: tuple[int, int, int]) -> str | None:
    """None when ``model`` runs on a batch of two ``size`` images, else the first error line."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, *size))
    except Exception as err:  # any failure means "not at this size"; the message is kept
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()
    finally:
        model.train(was_training)
    return None
