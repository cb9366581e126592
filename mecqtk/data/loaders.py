"""Batch loaders with reproducible, epoch-dependent shuffling and augmentation.

Both loaders yield ``(images, labels)``: float32 [B, 3, H, W] normalised with the model's mean
and std, and int64 [B]. Shuffling uses ``DistributedSampler`` (one replica unless distributed),
whose order depends only on ``seed + epoch``; augmentation randomness is derived from
``(seed, epoch, rank)`` or ``(seed, epoch, sample index)``. Two runs with the same seed therefore
see bit-identical batches, whatever the number of workers, and a run resumed at epoch ``e``
sees what it would have seen without the interruption.

Call ``set_epoch(e)`` before iterating to pick epoch ``e`` explicitly; without it every new
pass over a loader moves on to the next epoch by itself.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.folder import default_loader

from mecqtk.data.augment import crop_flip, crop_flip_params, normalize
from mecqtk.data.memory import ImageStore
from mecqtk.errors import DataError

__all__ = ["BatchLoader", "FolderLoader", "MemoryLoader", "SampleDataset"]

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchLoader(Protocol):
    """What training and evaluation code may rely on, whichever loader it gets."""

    num_samples: int
    labels: torch.Tensor

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def _epoch_sampler(num_samples: int, seed: int, distributed: bool) -> DistributedSampler:
    indices = range(num_samples)
    if distributed:
        return DistributedSampler(indices, shuffle=True, seed=seed)
    return DistributedSampler(indices, num_replicas=1, rank=0, shuffle=True, seed=seed)


def _mix_seed(*parts: int) -> int:
    # A fixed arithmetic mix (not hash()) so seeds are identical across processes and runs.
    mixed = 0
    for part in parts:
        mixed = (mixed * 6_364_136_223_846_793_005 + part + 1_442_695_040_888_963_407) % 2**63
    return mixed


def _batch_count(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


class MemoryLoader:
    """Batches cut from a uint8 tensor in memory; training batches get crop + flip.

    The training loader drops the last incomplete batch (a batch of one breaks BatchNorm) unless
    the subset is smaller than one batch.
    """

    def __init__(
        self,
        store: ImageStore,
        indices: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int,
        distributed: bool = False,
        resize_to: tuple[int, int] | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        self._store = store
        # images smaller than a fixed-size model's input are upsampled batch-wise, after
        # augmentation at their own size (as timm's transforms crop before resizing)
        self.resize_to = resize_to
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic") else (
            "bilinear")
        self._indices = indices
        self._images: torch.Tensor | None = None
        self.labels = store.labels[indices]
        self.num_samples = len(indices)
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self._sampler = _epoch_sampler(self.num_samples, seed, distributed) if train else None
        self._per_pass = len(self._sampler) if self._sampler is not None else self.num_samples
        self.drop_last = train and self._per_pass >= batch_size

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s order and augmentation."""
        self.epoch = epoch

    def __len__(self) -> int:
        return _batch_count(self._per_pass, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        if self._images is None:
            self._images = self._store.take(self._indices)
        return self._batches(epoch, self._images)

    def _batches(self, epoch: int, images: torch.Tensor) -> Iterator[Batch]:
        if self._sampler is None:
            order = torch.arange(self.num_samples)
            params = None
        else:
            self._sampler.set_epoch(epoch)
            order = torch.tensor(list(self._sampler), dtype=torch.int64)
            # Augmentation is drawn per position of the epoch's global order (the order one
            # process would use) and each rank takes its own positions, so N processes with
            # the global batch augment every image exactly as one process does.
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            sampler = self._sampler
            top, left, flip = crop_flip_params(sampler.total_size, generator)
            positions = torch.arange(sampler.rank, sampler.total_size, sampler.num_replicas)
            params = (top[positions], left[positions], flip[positions])
        for batch_idx in range(len(self)):
            window = slice(batch_idx * self.batch_size, (batch_idx + 1) * self.batch_size)
            picked = order[window]
            batch = images[picked]
            if params is not None:
                batch = crop_flip(batch, tuple(p[window] for p in params))
            images_out = normalize(batch, self.mean, self.std)
            if self.resize_to is not None:
                images_out = F.interpolate(images_out, size=self.resize_to,
                                           mode=self.interpolation, align_corners=False)
            yield images_out, self.labels[picked]


class SampleDataset(Dataset):
    """Image files decoded with PIL and transformed one by one, as torchvision's ImageFolder.

    With a ``seed``, each sample's random transforms are seeded from (seed, epoch, index): the
    result does not depend on worker count or order, and the process's RNGs are left untouched.
    """

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        transform: Callable,
        seed: int | None,
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            image = default_loader(path)
        except OSError as exc:
            raise DataError(f"cannot decode image {path} ({exc}); replace or delete it") from exc
        if self.seed is None:
            return self.transform(image), self.labels[index]
        with _seeded_rngs(_mix_seed(self.seed, self.epoch, index)):
            return self.transform(image), self.labels[index]


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    # timm's and torchvision's transforms draw from Python's, NumPy's and torch's global RNGs.
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class FolderLoader:
    """A torch DataLoader over a SampleDataset, with the epoch forwarded to sampler and dataset."""

    def __init__(
        self,
        dataset: SampleDataset,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        num_workers: int,
        distributed: bool = False,
    ) -> None:
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.labels = torch.tensor(dataset.labels, dtype=torch.int64)
        self.epoch = 0
        self._sampler = _epoch_sampler(len(dataset), seed, distributed) if train else None
        per_pass = len(self._sampler) if self._sampler is not None else len(dataset)
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._sampler,
            num_workers=num_workers,
            drop_last=train and per_pass >= batch_size,
            # Keeps DataLoader from drawing its worker seed from the global RNG.
            generator=torch.Generator().manual_seed(seed),
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s order and augmentation."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        return iter(self._loader)
