"""The ``--data`` string: which dataset format, where it lives, and where its splits are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mecqtk.errors import DataError

__all__ = ["CIFAR10_FILES", "EVAL_SPLIT_NAMES", "TRAIN_SPLIT_NAME", "DataSpec", "parse_spec"]

FORMS = (
    "imagefolder:PATH (PATH/train/<class>/* and PATH/val/<class>/* or PATH/test/<class>/*)",
    "cifar10:PATH (the CIFAR-10 python batches, in PATH or PATH/cifar-10-batches-py)",
)
TRAIN_SPLIT_NAME = "train"
EVAL_SPLIT_NAMES = ("val", "test")
CIFAR10_DIR_NAME = "cifar-10-batches-py"
CIFAR10_META = "batches.meta"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_FILES = (CIFAR10_META, *CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source.

    Attributes:
        kind: ``"imagefolder"`` or ``"cifar10"``.
        path: Absolute folder given after the prefix.
    """

    kind: str
    path: Path

    def train_dir(self) -> Path:
        """The imagefolder training split, which must exist."""
        train = self.path / TRAIN_SPLIT_NAME
        if not train.is_dir():
            raise DataError(f"{self.path} has no {TRAIN_SPLIT_NAME}/ folder; expected {FORMS[0]}")
        return train

    def eval_dir(self) -> Path:
        """The imagefolder evaluation split: ``val/`` if present, else ``test/``."""
        for name in EVAL_SPLIT_NAMES:
            if (self.path / name).is_dir():
                return self.path / name
        raise DataError(f"{self.path} has neither a val/ nor a test/ folder; expected {FORMS[0]}")

    def cifar10_dir(self) -> Path:
        """The folder holding the CIFAR-10 python batches, with every batch file present."""
        nested = self.path / CIFAR10_DIR_NAME
        folder = nested if nested.is_dir() else self.path
        missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"{folder} lacks the CIFAR-10 file(s) {', '.join(missing)}; expected {FORMS[1]}"
            )
        return folder


def parse_spec(text: str) -> DataSpec:
    """Parse ``"imagefolder:PATH"`` or ``"cifar10:PATH"``.

    Args:
        text: The data source as given on the command line.

    Returns:
        The spec with ``~`` expanded and the path made absolute.

    Raises:
        DataError: Unknown prefix, empty path, or a path that does not exist.

    Example:
        >>> parse_spec("cifar10:/data/cifar").kind
        'cifar10'
    """
    kind, sep, raw_path = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("imagefolder", "cifar10") or not raw_path.strip():
        raise DataError(f"data source '{text}' is not understood; use {' or '.join(FORMS)}")
    path = Path(raw_path.strip()).expanduser().absolute()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist (from '{text}')")
    return DataSpec(kind=kind, path=path)
