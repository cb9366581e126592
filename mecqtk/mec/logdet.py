"""``log det(I + lam * A B^T)`` for feature matrices, exactly or as a truncated Taylor series.

This is the single numerical kernel behind every coding length in :mod:`mecqtk.mec`. Inputs are
batches of ``m x d`` matrices; the determinant is evaluated on whichever Gram matrix is smaller,
``A B^T`` (m x m, the *samples* form) or ``B^T A`` (d x d, the *features* form). Sylvester's
identity ``det(I_m + lam A B^T) = det(I_d + lam B^T A)`` makes the two equal, and the cyclic
property of the trace gives ``tr((A B^T)^k) = tr((B^T A)^k)``, so the Taylor series agrees too.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Form = Literal["auto", "samples", "features"]
"""Which Gram matrix to use: ``auto`` picks the smaller (samples when m <= d)."""


def log_det_identity_plus(
    a: Tensor,
    b: Tensor,
    lam: float | Tensor,
    *,
    order: int | None,
    form: Form = "auto",
    row_weights: Tensor | None = None,
) -> Tensor:
    """Return ``log det(I + lam * W a @ b^T)`` over the trailing two dimensions.

    ``W = diag(row_weights)`` (the identity when ``None``). Row weights let one Gram matrix serve
    a whole batch of weightings: ``(K, m)`` weights on ``(m, d)`` features give K values for the
    price of one ``m x m`` product when ``m <= d``.

    Args:
        a: ``(..., m, d)`` features, usually with unit-norm rows.
        b: ``(..., m, d)`` features broadcastable against ``a``.
        lam: a positive scale, or a tensor of scales with the batch shape of ``a``.
        order: number of Taylor terms ``sum_{k<=order} (-1)^(k+1)/k tr((lam a b^T)^k)``, or
            ``None`` for the exact value through ``torch.linalg.slogdet`` in float64.
        form: ``"samples"`` (m x m Gram), ``"features"`` (d x d Gram) or ``"auto"`` (smaller).
        row_weights: ``(..., m)`` non-negative weights on the rows of ``a``, or ``None``.

    Returns:
        A tensor with the broadcast batch shape of the arguments: float64 inputs give float64,
        anything else float32. The exact form returns NaN where the determinant is not
        positive (possible only when ``a`` and ``b`` differ); the series is a polynomial and
        always finite.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64), dim=-1)
        >>> exact = log_det_identity_plus(z, z, 0.1, order=None)
        >>> bool(torch.isclose(exact, log_det_identity_plus(z, z, 0.1, order=12)))
        True
    """
    if form not in ("auto", "samples", "features"):
        raise ValueError(f"form must be 'auto', 'samples' or 'features', got {form!r}")
    if order is not None:
        _check_order(order)
    m, d = a.shape[-2], a.shape[-1]
    samples = form == "samples" or (form == "auto" and m <= d)
    result_dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    # Autocast would run the Gram in half precision, where the series cancels badly.
    with torch.autocast(device_type=a.device.type, enabled=False):
        dtype = torch.float64 if order is None else result_dtype
        weights = None if row_weights is None else row_weights.to(dtype)
        gram = _gram(a.to(dtype), b.to(dtype), weights, samples)
        if order is None:
            return _exact(_scaled(gram, lam)).to(result_dtype)
        return _series(_scaled(gram, lam), order)


def trace_of_powers(x: Tensor, order: int) -> list[Tensor]:
    """Return ``[tr(x), tr(x^2), ..., tr(x^order)]`` for square matrices ``x`` of shape (..., s, s).

    ``tr(x^(i+j)) = sum(x^i * (x^j)^T)``, so only the powers up to ``ceil(order / 2)`` are formed:
    one matrix product for order 4, two for order 6. The remaining traces cost O(s^2) each.
    """
    half = (order + 1) // 2
    powers = [x]
    for _ in range(half - 1):
        powers.append(powers[-1] @ x)
    traces = []
    for k in range(1, order + 1):
        i, j = (k + 1) // 2, k // 2
        if j == 0:
            traces.append(torch.diagonal(x, dim1=-2, dim2=-1).sum(-1))
        else:
            traces.append((powers[i - 1] * powers[j - 1].mT).sum((-2, -1)))
    return traces


def _gram(a: Tensor, b: Tensor, weights: Tensor | None, samples: bool) -> Tensor:
    if samples:
        gram = a @ b.mT
        return gram if weights is None else weights.unsqueeze(-1) * gram
    return b.mT @ (a if weights is None else weights.unsqueeze(-1) * a)


def _scaled(gram: Tensor, lam: float | Tensor) -> Tensor:
    if isinstance(lam, Tensor):
        return gram * lam.to(gram.dtype)[..., None, None]
    return gram * lam


def _check_order(order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer or None (exact), got {order!r}")


def _series(x: Tensor, order: int) -> Tensor:
    total = torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    for k, trace in enumerate(trace_of_powers(x, order), start=1):
        total = total + (trace / k if k % 2 else -trace / k)
    return total


def _exact(x: Tensor) -> Tensor:
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    sign, log_abs = torch.linalg.slogdet(eye + x)
    return torch.where(sign > 0, log_abs, torch.full_like(log_abs, math.nan))
