"""Fixed class-balanced subsets for ``--limit-train`` / ``--limit-val``."""

from __future__ import annotations

import torch

from mecqtk.errors import DataError

__all__ = ["balanced_subset"]


def balanced_subset(labels: torch.Tensor, limit: int | None, option: str) -> torch.Tensor:
    """Indices of ``limit`` samples spread evenly over the classes, in dataset order.

    The choice depends only on the labels, never on a seed: every class gives its first
    ``limit // C`` samples and the lowest-numbered classes one more each for the remainder.
    A class with too few samples gives all it has and the others make up the difference.

    Args:
        labels: int64 [N] class index of every sample, in dataset order.
        limit: How many samples to keep; None (or N or more) keeps all.
        option: Name of the setting, for the error message (``"limit_train"``).

    Returns:
        int64 indices into ``labels``, ascending.

    Example:
        >>> balanced_subset(torch.tensor([0, 0, 0, 1, 1, 1]), 3, "limit_train").tolist()
        [0, 1, 3]
    """
    if limit is None:
        return torch.arange(len(labels))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataError(f"{option} must be a positive number of images, got {limit!r}")
    if limit >= len(labels):
        return torch.arange(len(labels))
    # Position of each sample within its own class, counted in dataset order.
    by_class = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.empty_like(labels)
    rank_in_class[by_class] = torch.arange(len(labels)) - class_start[labels[by_class]]
    # Round-robin over classes: every class's first sample, then every second one, and so on.
    order = torch.argsort(rank_in_class * len(counts) + labels, stable=True)
    return torch.sort(order[:limit]).values
