"""Quantizer outputs kept for the backward pass as their integer codes, not as float32.

A conv or Linear saves its input for its weight gradient. In QAT that input is a quantizer's
output: a float32 tensor that holds only ``2**bits`` distinct values, ``(code - zero) * step``.
Inside :func:`codes_for_backward` such a tensor is stored as its grid integers ``q`` in one
byte each (int8 for signed grids, uint8 for unsigned ones), which the quantizer's fused forward
loop writes beside its float output, and rebuilt by the same float32 subtraction and product
when the backward needs it, bit for bit the tensor the forward computed. The float model keeps
one activation per layer input; QAT used to keep two (the quantizer's input and its output),
and inception_v3's training step at 299 px did not fit in 24 GB at the recipes' batch of 128.

Only eager autograd sees these hooks; ``torch.compile`` plans its own saved tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.weak import WeakTensorKeyDictionary

Tensor = torch.Tensor

_grids: WeakTensorKeyDictionary | None = None  # quantizer output -> its codes, while active


def code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    """The integer type a quantizer on ``[qmin, qmax]`` writes its grid integers in, or None
    outside :func:`codes_for_backward` (no codes are wanted)."""
    if _grids is None:
        return None
    # the grid integers, not q - zero_point (which a learned zero point can move anywhere in
    # [qmin - qmax, qmax - qmin]): every grid of up to 8 bits fits one byte. int16 is kept for
    # wider grids only: inductor's CPU loop writes int16 about 20x slower than int8 or uint8
    # (11.6 ms against 0.55 ms on a 128x64x16x16 activation)
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    return torch.int16


def remember_codes(out: Tensor, grid: Tensor, step: Tensor, zero_point: Tensor | None,
                   decode: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> None:
    """Note that ``out`` is ``decode(grid, step, zero_point)``, ``grid`` written by the
    quantizer's own forward loop (no extra pass over the activation); a no-op outside
    :func:`codes_for_backward`."""
    if _grids is not None and out.requires_grad:
        _grids[out] = (grid, step, zero_point, decode)


def _pack(tensor: Tensor) -> object:
    entry = _grids.get(tensor) if _grids is not None else None
    if entry is None:
        return tensor
    return (*entry, tensor.requires_grad)


def _unpack(packed: object) -> Tensor:
    if isinstance(packed, Tensor):
        return packed
    grid, step, zero_point, decode, requires_grad = packed
    return decode(grid, step, zero_point).requires_grad_(requires_grad)


@contextmanager
def codes_for_backward() -> Iterator[None]:
    """Within this block (a training forward), quantizer outputs that autograd saves are stored
    as integer codes.

    Example:
        >>> with codes_for_backward():
        ...     loss = criterion(qmodel(images), labels)
        >>> loss.backward()
    """
    global _grids
    previous = _grids
    _grids = WeakTensorKeyDictionary()
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _grids = previous
