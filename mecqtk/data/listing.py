"""Find the classes and image files of an image-folder split, without decoding anything."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from mecqtk.errors import DataError

__all__ = ["FileListing", "check_same_classes", "class_folders", "first_image", "list_split"]


@dataclass(frozen=True)
class FileListing:
    """Image files of one split, sorted by class then file name; ``labels[i]`` indexes classes."""

    root: Path
    class_names: list[str]
    files: list[str]
    labels: list[int]


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir``; none is a DataError."""
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not names:
        raise DataError(
            f"{split_dir} has no class folders; put the images of each class in "
            f"{split_dir}/<class name>/"
        )
    return names


def check_same_classes(train_dir: Path, eval_dir: Path) -> list[str]:
    """Class names shared by both splits; any difference is a DataError naming the folders."""
    train_classes = class_folders(train_dir)
    eval_classes = class_folders(eval_dir)
    if train_classes != eval_classes:
        only_train = sorted(set(train_classes) - set(eval_classes))
        only_eval = sorted(set(eval_classes) - set(train_classes))
        raise DataError(
            f"class folders differ between {train_dir} and {eval_dir}: only in "
            f"{train_dir.name}/: {', '.join(only_train) or '-'}; only in {eval_dir.name}/: "
            f"{', '.join(only_eval) or '-'}; both splits need the same classes"
        )
    return train_classes


def list_split(split_dir: Path, class_names: list[str]) -> FileListing:
    """Every image file under ``split_dir/<class>/`` for the given classes."""
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        images = _class_images(split_dir / name)
        files += images
        labels += [label] * len(images)
    return FileListing(root=split_dir, class_names=class_names, files=files, labels=labels)


def first_image(split_dir: Path, class_names: list[str]) -> str:
    """The first image file of the first class: what the split's storage is decided from."""
    return _class_images(split_dir / class_names[0])[0]


def _class_images(class_dir: Path) -> list[str]:
    images = sorted(
        entry.path
        for entry in os.scandir(class_dir)
        if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)
    )
    if not images:
        raise DataError(
            f"class folder {class_dir} holds no images ({', '.join(IMG_EXTENSIONS)}); "
            "add images or remove the folder from every split"
        )
    return images
