"""Model creation: every timm model plus mecqtk's CIFAR ResNets, through timm's one factory."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
from torch import nn

from mecqtk.errors import ModelError
from mecqtk.models import cifar_resnet  # noqa: F401  (registers cifar_resnet* in timm)
from mecqtk.models.checkpoint import load_checkpoint_weights
from mecqtk.models.input_fit import InputFit, fit_at_own_size, fit_model_to_images

__all__ = [
    "InputFit",
    "create_model",
    "fit_at_own_size",
    "fit_model_to_images",
    "is_external",
    "load_checkpoint_weights",
    "require_known_model",
]

# Names with these prefixes are resolved by timm itself (Hugging Face Hub, local folders).
_EXTERNAL_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
_SUGGESTIONS = 5


def create_model(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a timm model (including ``cifar_resnet20/32/44/56``) with a fresh classifier size.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        num_classes: Number of classifier outputs.
        pretrained: Download timm's pretrained weights (needs network access).
        checkpoint: Local weights file loaded after construction; must fit exactly.
        **model_kwargs: Passed to the timm model's constructor (``img_size=32``; see
            :func:`fit_model_to_images`).

    Returns:
        The model, in training mode, with ``model.pretrained_cfg`` describing its input.

    Raises:
        ModelError: Unknown name (close names are suggested), ``pretrained=True`` for a model
            without published weights, or a checkpoint that does not fit.

    Example:
        >>> model = create_model("cifar_resnet20", num_classes=10)
        >>> model.pretrained_cfg["input_size"]
        (3, 32, 32)
    """
    require_known_model(name)
    if pretrained and not name.startswith(_EXTERNAL_PREFIXES) and not _has_weights(name):
        raise ModelError(
            f"model '{name}' has no downloadable pretrained weights; drop pretrained and pass "
            "a local weights file as checkpoint instead"
        )
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                              **model_kwargs)
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
    return model


def is_external(name: str) -> bool:
    """Whether timm resolves ``name`` outside its registry (Hugging Face Hub, a local folder)."""
    return name.startswith(_EXTERNAL_PREFIXES)


def require_known_model(name: str) -> None:
    """Raise ModelError (with close names suggested) unless timm knows ``name``."""
    if not is_external(name) and not timm.is_model(name):
        raise ModelError(_unknown_name_message(name))


def _has_weights(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return cfg is not None and bool(cfg.has_weights)


def _unknown_name_message(name: str) -> str:
    candidates = difflib.get_close_matches(name, timm.list_models(), n=_SUGGESTIONS, cutoff=0.5)
    hint = f"did you mean {', '.join(candidates)}?" if candidates else "no similar names exist;"
    return f"unknown model '{name}'; {hint} timm.list_models() lists every name"
