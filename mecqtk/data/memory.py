"""Small images held in memory as uint8 [N, 3, H, W], decoded once per process.

A split is decoded the first time a loader asks for it, and only the samples asked for, so a run
with ``--limit-train 500`` decodes 500 files. Decoded splits stay in a per-process cache keyed by
folder and split, which makes repeated loads (tests, train-then-evaluate) free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mecqtk.data import cifar10
from mecqtk.data.listing import list_split
from mecqtk.errors import DataError

__all__ = [
    "MAX_IN_MEMORY_SIDE",
    "ImageStore",
    "cifar10_store",
    "clear_cache",
    "folder_store",
    "image_size",
]

# Images up to this size (both sides) are decoded into memory; larger ones stream from disk.
MAX_IN_MEMORY_SIDE = 64


class ImageStore(Protocol):
    """Labels of every sample of a split, and their pixels on request."""

    labels: torch.Tensor
    shape: tuple[int, int, int]

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 [len(indices), 3, H, W] images of the given samples."""


class TensorStore:
    """A split already fully in memory (CIFAR-10 batches)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels
        self.shape = (images.shape[1], images.shape[2], images.shape[3])

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        if _is_everything(indices, len(self.labels)):
            return self.images
        return self.images[indices]


class DecodedFolder:
    """Image files of one split, decoded on demand into one preallocated uint8 tensor."""

    def __init__(self, split_dir: Path, class_names: list[str]) -> None:
        self.listing = list_split(split_dir, class_names)
        self.labels = torch.tensor(self.listing.labels, dtype=torch.int64)
        width, height = image_size(self.listing.files[0])
        self.shape = (3, height, width)
        self._images: torch.Tensor | None = None
        self._decoded = torch.zeros(len(self.labels), dtype=torch.bool)

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        # The cache outlives the caller's mode: never let it become an inference-mode tensor.
        with torch.inference_mode(False):
            if self._images is None:
                self._images = torch.empty((len(self.labels), *self.shape), dtype=torch.uint8)
            pending = indices[~self._decoded[indices]]
            self._decode(pending.tolist())
            self._decoded[pending] = True
            if _is_everything(indices, len(self.labels)):
                return self._images
            return self._images[indices]

    def _decode(self, positions: list[int]) -> None:
        assert self._images is not None
        # Single-threaded on purpose: on 2 shared cores, threads made PIL decoding slower.
        pixels = self._images.numpy()
        for position in positions:
            path = self.listing.files[position]
            image = decode_rgb(path)
            if image.shape != pixels.shape[1:]:
                raise DataError(
                    f"{path} is {image.shape[2]}x{image.shape[1]} but {self.listing.files[0]} "
                    f"is {self.shape[2]}x{self.shape[1]}; small images kept in memory must all "
                    "have one size, resize them first"
                )
            pixels[position] = image


def decode_rgb(path: str) -> np.ndarray:
    """Decode one image file with PIL to a uint8 [3, H, W] RGB array."""
    try:
        with Image.open(path) as image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot decode image {path} ({exc}); replace or delete it") from exc


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); replace or delete it") from exc


_CACHE: dict[tuple[str, str], ImageStore] = {}


def folder_store(split_dir: Path, class_names: list[str]) -> DecodedFolder:
    """The (cached) in-memory store of an image-folder split."""
    key = (str(split_dir.resolve()), "imagefolder")
    store = _CACHE.get(key)
    if not isinstance(store, DecodedFolder) or store.listing.class_names != class_names:
        store = DecodedFolder(split_dir, class_names)
        _CACHE[key] = store
    return store


def cifar10_store(folder: Path, train: bool) -> TensorStore:
    """The (cached) in-memory store of the CIFAR-10 train or test batches."""
    key = (str(folder.resolve()), "cifar10-train" if train else "cifar10-test")
    store = _CACHE.get(key)
    if not isinstance(store, TensorStore):
        with torch.inference_mode(False):
            store = TensorStore(*cifar10.read_split(folder, train))
        _CACHE[key] = store
    return store


def clear_cache() -> None:
    """Forget every decoded split (frees their memory once no loader holds them)."""
    _CACHE.clear()


def _is_everything(indices: torch.Tensor, count: int) -> bool:
    return len(indices) == count and bool(torch.equal(indices, torch.arange(count)))
