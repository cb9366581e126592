"""Datasets for training and evaluation: ``imagefolder:PATH`` and ``cifar10:PATH``.

Small images (both sides at most 64 px, judged from the first training image) are decoded once
into uint8 tensors and augmented batch-wise in memory; larger ones stream from disk through
timm's transforms. Either way the loaders yield normalised float32 NCHW images and int64 labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm.data
import torch
from torch import nn

from mecqtk.data import cifar10
from mecqtk.data.listing import check_same_classes, first_image, list_split
from mecqtk.data.loaders import BatchLoader, FolderLoader, MemoryLoader, SampleDataset
from mecqtk.data.memory import (
    MAX_IN_MEMORY_SIDE,
    ImageStore,
    cifar10_store,
    clear_cache,
    folder_store,
    image_size,
)
from mecqtk.data.spec import DataSpec, parse_spec
from mecqtk.data.subset import balanced_subset
from mecqtk.errors import DataError

__all__ = [
    "BatchLoader",
    "DataBundle",
    "DataSpec",
    "build_data",
    "clear_cache",
    "parse_spec",
    "peek_image_size",
    "peek_num_classes",
]


@dataclass
class DataBundle:
    """Loaders and facts about a dataset, as ``build_data`` prepared them for one model.

    Attributes:
        train_loader: Shuffled, augmented training batches; call ``set_epoch`` each epoch.
        val_loader: Validation batches in dataset order, without augmentation.
        num_classes: Number of classes (class folders, or CIFAR-10's label names).
        class_names: Class names in label order.
        input_size: (C, H, W) of the batches: the images' own size when they are kept in
            memory (a timm ImageNet model then runs at 32x32 on CIFAR), else the model's.
        mean: Per-channel mean used for normalisation (from the model's config).
        std: Per-channel std used for normalisation (from the model's config).
    """

    train_loader: BatchLoader
    val_loader: BatchLoader
    num_classes: int
    class_names: list[str]
    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def peek_num_classes(spec: str) -> tuple[int, list[str]]:
    """Number and names of the classes of a data source, without decoding any image.

    Example:
        >>> peek_num_classes("imagefolder:../shared/data/cifar10-jpeg")  # doctest: +SKIP
        (10, ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', ...])
    """
    class_names = _class_names(parse_spec(spec))
    return len(class_names), class_names


def build_data(
    spec: str,
    *,
    model: nn.Module,
    batch_size: int,
    limit_train: int | None,
    limit_val: int | None,
    seed: int,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    distributed: bool = False,
    input_size: Sequence[int] | None = None,
) -> DataBundle:
    """Train and validation loaders for ``spec``, preprocessed the way ``model`` expects.

    Mean, std (and, for large images, input size and resizing) come from the model's timm
    config (``model.pretrained_cfg``). Limits pick a fixed class-balanced subset that does not
    depend on ``seed``; ``seed`` only drives shuffling and augmentation.

    Args:
        spec: ``"imagefolder:PATH"`` or ``"cifar10:PATH"``.
        model: The model to be trained; its classifier must match the number of classes.
        batch_size: Training batch size.
        limit_train: Keep this many training images (None: all).
        limit_val: Keep this many validation images (None: all).
        seed: Seed of shuffling and augmentation.
        eval_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers for images streamed from disk (unused in memory).
        distributed: Shard training batches over the initialised process group. Validation
            is not sharded: every rank sees the whole validation set.
        input_size: (C, H, W) the model takes, when it differs from the size of small images
            kept in memory: they are resized to it with the interpolation of the model's timm
            config (see :func:`mecqtk.models.fit_model_to_images`). None: their own size.

    Returns:
        The loaders plus class names, input size and normalisation.

    Raises:
        DataError: The source is malformed, empty or inconsistent, or does not fit the model.

    Example:
        >>> data = build_data("cifar10:~/data", model=model, batch_size=128,  # doctest: +SKIP
        ...                   limit_train=None, limit_val=None, seed=0)
        >>> for epoch in range(epochs):  # doctest: +SKIP
        ...     data.train_loader.set_epoch(epoch)
        ...     for images, labels in data.train_loader: ...
    """
    parsed = parse_spec(spec)
    eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
    for option, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        _require_positive(option, value)
    if num_workers < 0:
        raise DataError(f"num_workers must be 0 or more, got {num_workers}")
    class_names = _class_names(parsed)
    _check_model_outputs(model, len(class_names))
    config = timm.data.resolve_data_config({}, model=model)
    mean, std = tuple(config["mean"]), tuple(config["std"])

    stores = _memory_stores(parsed, class_names)
    if stores is not None:
        train_store, val_store = stores
        resize_to = None
        if input_size is not None and tuple(input_size) != tuple(train_store.shape):
            if input_size[0] != train_store.shape[0]:
                raise DataError(f"the images have {train_store.shape[0]} channels but the model "
                                f"takes {input_size[0]}")
            resize_to = (int(input_size[1]), int(input_size[2]))
        resize = {"resize_to": resize_to,
                  "interpolation": config.get("interpolation") or "bicubic"}
        train_loader: BatchLoader = MemoryLoader(
            train_store,
            balanced_subset(train_store.labels, limit_train, "limit_train"),
            batch_size=batch_size,
            mean=mean,
            std=std,
            train=True,
            seed=seed,
            distributed=distributed,
            **resize,
        )
        val_loader: BatchLoader = MemoryLoader(
            val_store,
            balanced_subset(val_store.labels, limit_val, "limit_val"),
            batch_size=eval_batch_size,
            mean=mean,
            std=std,
            train=False,
            seed=seed,
            **resize,
        )
        input_size = (*train_store.shape[:1], *resize_to) if resize_to else train_store.shape
    else:
        train_loader, val_loader = _folder_loaders(
            parsed,
            class_names,
            config,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            limit_train=limit_train,
            limit_val=limit_val,
            seed=seed,
            num_workers=num_workers,
            distributed=distributed,
        )
        input_size = tuple(config["input_size"])
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=len(class_names),
        class_names=class_names,
        input_size=input_size,
        mean=mean,
        std=std,
    )


def peek_image_size(spec: str) -> tuple[int, int, int] | None:
    """(C, H, W) of a data source's images when they are small enough to be kept in memory
    (judged from the first training image), None when they stream from disk and are resized to
    the model's configured size anyway.

    Example:
        >>> peek_image_size("imagefolder:../shared/data/cifar10-jpeg")  # doctest: +SKIP
        (3, 32, 32)
    """
    parsed = parse_spec(spec)
    if parsed.kind == "cifar10":
        parsed.cifar10_dir()  # raises when files are missing
        return cifar10.IMAGE_SHAPE
    train_dir = parsed.train_dir()
    width, height = image_size(first_image(train_dir, _class_names(parsed)))
    return None if max(width, height) > MAX_IN_MEMORY_SIDE else (3, height, width)


def _class_names(parsed: DataSpec) -> list[str]:
    if parsed.kind == "cifar10":
        return cifar10.read_class_names(parsed.cifar10_dir())
    return check_same_classes(parsed.train_dir(), parsed.eval_dir())


def _memory_stores(
    parsed: DataSpec, class_names: list[str]
) -> tuple[ImageStore, ImageStore] | None:
    if parsed.kind == "cifar10":
        folder = parsed.cifar10_dir()
        return cifar10_store(folder, train=True), cifar10_store(folder, train=False)
    train_dir = parsed.train_dir()
    width, height = image_size(first_image(train_dir, class_names))
    if max(width, height) > MAX_IN_MEMORY_SIDE:
        return None
    return folder_store(train_dir, class_names), folder_store(parsed.eval_dir(), class_names)


def _folder_loaders(
    parsed: DataSpec,
    class_names: list[str],
    config: dict,
    *,
    batch_size: int,
    eval_batch_size: int,
    limit_train: int | None,
    limit_val: int | None,
    seed: int,
    num_workers: int,
    distributed: bool,
) -> tuple[FolderLoader, FolderLoader]:
    loaders = []
    for train, split_dir, limit, option, size in (
        (True, parsed.train_dir(), limit_train, "limit_train", batch_size),
        (False, parsed.eval_dir(), limit_val, "limit_val", eval_batch_size),
    ):
        listing = list_split(split_dir, class_names)
        picked = balanced_subset(torch.tensor(listing.labels), limit, option).tolist()
        dataset = SampleDataset(
            [listing.files[i] for i in picked],
            [listing.labels[i] for i in picked],
            timm.data.create_transform(**config, is_training=train),
            seed=seed if train else None,
        )
        loaders.append(
            FolderLoader(
                dataset,
                batch_size=size,
                train=train,
                seed=seed,
                num_workers=num_workers,
                distributed=distributed and train,
            )
        )
    return loaders[0], loaders[1]


def _require_positive(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{option} must be a positive integer, got {value!r}")


def _check_model_outputs(model: nn.Module, num_classes: int) -> None:
    model_classes = getattr(model, "num_classes", None)
    if isinstance(model_classes, int) and model_classes != num_classes:
        raise DataError(
            f"the model has {model_classes} outputs but the data has {num_classes} classes; "
            f"create the model with num_classes={num_classes}"
        )
