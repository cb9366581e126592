"""Read the CIFAR-10 "python version" batches (the format torchvision downloads).

Each batch is a pickled dict with ``data`` (N x 3072 uint8, channel-planar 32x32 RGB) and
``labels``; ``batches.meta`` holds ``label_names``. Pickle can run code on load, exactly as with
torchvision's reader: only point this at files you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from mecqtk.data.spec import CIFAR10_META, CIFAR10_TEST_BATCH, CIFAR10_TRAIN_BATCHES
from mecqtk.errors import DataError

__all__ = ["read_class_names", "read_split"]

_SIDE = 32
IMAGE_SHAPE = (3, _SIDE, _SIDE)
_PIXELS = 3 * _SIDE * _SIDE


def read_class_names(folder: Path) -> list[str]:
    """Class names from ``batches.meta``, in label order."""
    meta = _unpickle(folder / CIFAR10_META)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{folder / CIFAR10_META} has no 'label_names' list; is it CIFAR-10?")
    return [str(name) for name in names]


def read_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N] of the train or test batches."""
    names = CIFAR10_TRAIN_BATCHES if train else (CIFAR10_TEST_BATCH,)
    images, labels = [], []
    for name in names:
        batch_images, batch_labels = _read_batch(folder / name)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{path} has no N x {_PIXELS} 'data' array; is it a CIFAR-10 batch?")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        raise DataError(f"{path} has no 'labels' list matching its {data.shape[0]} images")
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    return images.view(-1, 3, _SIDE, _SIDE), torch.tensor(labels, dtype=torch.int64)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(
            f"cannot read CIFAR-10 file {path} ({exc}); re-extract the archive"
        ) from exc
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not a CIFAR-10 batch dict")
    return content
