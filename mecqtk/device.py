"""Where a command computes: ``--device auto|cpu|cuda`` to a torch device.

Its own module so that commands which only evaluate (``mecqtk report``) need not import the
trainer to read their ``--device`` option.
"""

from __future__ import annotations

import torch

from mecqtk.errors import MecqtkError


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when a GPU is available, else the CPU; asking for CUDA without one is a
    one-line error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MecqtkError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(device)
