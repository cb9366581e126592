"""Load a checkpoint file's weights into a model, with errors that say exactly what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mecqtk.errors import ModelError

__all__ = ["load_checkpoint_weights"]

# Wrappers that prefix every key: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Containers in which training scripts commonly nest the state dict.
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
# BatchNorm's step counter is absent from old checkpoints and does not affect inference.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_LISTED_KEYS = 5


def load_checkpoint_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the tensors stored in ``path`` into ``model``, requiring an exact fit.

    The file may hold a bare state dict or one nested under ``"state_dict"``, ``"model"`` or
    ``"model_state_dict"``; a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix
    is removed. It is read with ``torch.load(map_location="cpu", weights_only=True)``.

    Args:
        model: The model whose parameters and buffers are overwritten.
        path: Checkpoint file.

    Raises:
        ModelError: The file is missing or unreadable, holds no state dict, or its keys or
            shapes differ from the model's.

    Example:
        >>> model = create_model("cifar_resnet20", num_classes=10)  # doctest: +SKIP
        >>> load_checkpoint_weights(model, "resnet20-12fca82f.th")  # doctest: +SKIP
    """
    path = Path(path)
    state_dict = _strip_prefixes(_extract_state_dict(_read(path), path))
    problems = _describe_mismatch(model, state_dict)
    if problems:
        raise ModelError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=False)


def _read(path: Path) -> object:
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; pass the path of a saved state dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged or foreign files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot read checkpoint {path} ({reason}); it must be a complete file written by "
            "torch.save holding only tensors and plain containers"
        ) from exc


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ModelError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors; "
            "save model.state_dict()"
        )
    for key in _NESTING_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(obj):
        raise ModelError(
            f"checkpoint {path} has no state dict (top-level keys: {_short_list(list(obj))}); "
            "save model.state_dict() or {'state_dict': model.state_dict()}"
        )
    return tensors


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _describe_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} is {tuple(state_dict[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch ({len(wrong_shape)}): {_short_list(wrong_shape)}")
        head_hint = _classifier_hint(model, state_dict)
        if head_hint:
            problems.append(head_hint)
    return problems


def _classifier_hint(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    head_name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    head_key = f"{head_name}.weight"
    num_classes = getattr(model, "num_classes", None)
    if head_key not in state_dict or num_classes is None:
        return None
    saved_classes = state_dict[head_key].shape[0]
    if saved_classes == num_classes:
        return None
    return (
        f"the checkpoint's classifier has {saved_classes} classes but the model was built with "
        f"num_classes={num_classes}; use a dataset with {saved_classes} classes or a checkpoint "
        "trained on this one"
    )


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED_KEYS])
    hidden = len(items) - _LISTED_KEYS
    return f"{shown} and {hidden} more" if hidden > 0 else shown
