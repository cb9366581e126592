"""The MEC coding length of a batch of features and the training loss built from it.

For two views ``Z1, Z2`` (m samples x d dims) with unit-norm rows, Liu et al. (NeurIPS 2022)
define the coding length ``mu * log det(I_m + lam * Z1 Z2^T)`` with ``lam = d / (m * eps2)`` and
``mu = (m + d) / 2``. The loss divides it by ``mu * m * lam`` so its first-order Taylor term is
minus the mean cosine similarity of the paired rows; see docs/mec.md for the derivation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mecqtk.mec.logdet import log_det_identity_plus


def coding_length(
    z1: Tensor, z2: Tensor | None = None, *, eps2: float, order: int | None = 4
) -> Tensor:
    """Return the coding length ``mu * log det(I_m + lam * Z1 Z2^T)`` of one batch, in nats.

    Rows are L2-normalised here, so the result does not depend on their norms.

    Args:
        z1: ``(m, d)`` features of the first view.
        z2: ``(m, d)`` features of the second view; ``None`` codes ``z1`` against itself.
        eps2: the allowed squared coding error ``eps^2`` (> 0); ``lam = d / (m * eps2)``.
        order: Taylor terms (even orders are the safe choice, see docs/mec.md), or ``None`` for
            the exact log-determinant computed in float64.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs), differentiable in both views.

    Example:
        >>> z = torch.randn(128, 64)
        >>> length = coding_length(z, eps2=64.0)  # eps2 = d keeps the series convergent
        >>> length.shape
        torch.Size([])
    """
    a, b = unit_pair(z1, z2)
    m, d = a.shape
    lam = d / (m * check_eps2(eps2))
    return (m + d) / 2 * log_det_identity_plus(a, b, lam, order=order)


def mec_loss(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    eps2: float,
    order: int | None = 4,
    lam_scale: float = 1.0,
) -> Tensor:
    """Return the MEC training loss: the negative coding length in units of ``mu * m * lam``.

    ``loss = -log det(I + lam' Z1 Z2^T) / (m * lam')`` with ``lam' = lam * lam_scale``. Its
    Taylor expansion is ``-mean_i cos(z1_i, z2_i) + lam' / (2m) * sum_ij cos(z1_i, z2_j)^2 - ...``:
    alignment of the paired rows plus a penalty on the spread of all cross-pairs.

    Args:
        z1: ``(m, d)`` student features (receives the gradient in the default taps).
        z2: ``(m, d)`` second view, e.g. the frozen teacher on the same batch; ``None`` = ``z1``.
        eps2: the allowed squared coding error at the end of the warm-up (> 0).
        order: Taylor terms, or ``None`` for the exact value.
        lam_scale: factor in (0, 1] on ``lam`` during the warm-up (see :class:`MECSchedule`).

    Returns:
        A scalar to minimise; about ``-1`` for well-aligned, well-spread features.

    Example:
        >>> student, teacher = torch.randn(128, 64), torch.randn(128, 64)
        >>> loss = mec_loss(student, teacher, eps2=64.0, lam_scale=0.125)
        >>> loss.shape
        torch.Size([])
    """
    a, b = unit_pair(z1, z2)
    m, d = a.shape
    eps2_now = warmed_eps2(eps2, lam_scale)
    lam = d / (m * eps2_now)
    # 1 / (m * lam) == eps2 / d, the reference implementation's normalisation.
    return -log_det_identity_plus(a, b, lam, order=order) * (eps2_now / d)


def coding_length_unit(m: int, d: int, eps2: float) -> float:
    """Return ``mu * m * lam = (m + d) * d / (2 * eps2)``, the unit in which losses are expressed.

    Every MEC loss in mecqtk is ``-coding length / coding_length_unit(m, d, eps2)`` with the
    whole batch's ``m`` and the full feature width ``d``, so the plain, grouped and mixture
    losses are on one scale and the plain one's first-order term is minus the mean cosine.

    Example:
        >>> coding_length_unit(128, 64, 64.0)
        96.0
    """
    return (m + d) * d / (2 * check_eps2(eps2))


def taylor_radius_bound(z1: Tensor, z2: Tensor | None = None, *, eps2: float) -> Tensor:
    """Return ``lam * ||Z1||_2 * ||Z2||_2``, a bound on the spectral radius of ``lam Z1 Z2^T``.

    The Taylor series of the log-determinant converges when the spectral radius is below 1, so
    a value below 1 guarantees it (for ``z2=None`` the bound is the radius itself). It costs a
    singular value decomposition: a diagnostic for choosing ``eps2``, not for every step.

    Example:
        >>> round(float(taylor_radius_bound(torch.ones(4, 8), eps2=8.0)), 4)  # collapsed: d / eps2
        1.0
    """
    a, b = unit_pair(z1, z2)
    m, d = a.shape
    lam = d / (m * check_eps2(eps2))
    norm_a = torch.linalg.matrix_norm(a.detach(), ord=2)
    norm_b = norm_a if z2 is None else torch.linalg.matrix_norm(b.detach(), ord=2)
    return lam * norm_a * norm_b


def unit_pair(z1: Tensor, z2: Tensor | None) -> tuple[Tensor, Tensor]:
    """Check two ``(m, d)`` views; return them with unit rows (``z2=None``: ``z1`` twice)."""
    if z1.dim() != 2 or not z1.is_floating_point():
        raise ValueError(f"features must be a 2-D float tensor (m, d), got {_describe(z1)}")
    if z1.shape[0] < 1 or z1.shape[1] < 1:
        raise ValueError(f"features must have at least one row and column, got {tuple(z1.shape)}")
    a = F.normalize(z1, dim=-1)
    if z2 is None:
        return a, a
    if z2.shape != z1.shape or not z2.is_floating_point():
        raise ValueError(
            f"the two views must have the same shape, got {_describe(z1)} and {_describe(z2)}"
        )
    return a, F.normalize(z2, dim=-1)


def check_eps2(eps2: float) -> float:
    """Return ``eps2`` as a float, or raise ``ValueError`` if it is not a finite positive number."""
    value = float(eps2)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"eps2 must be a finite positive number, got {eps2!r}")
    return value


def warmed_eps2(eps2: float, lam_scale: float) -> float:
    """Return ``eps2 / lam_scale``: scaling ``lam`` by ``lam_scale`` is dividing ``eps2`` by it."""
    scale = float(lam_scale)
    if not 0 < scale <= 1:
        raise ValueError(f"lam_scale must lie in (0, 1], got {lam_scale!r}")
    return check_eps2(eps2) / scale


def _describe(z: Tensor) -> str:
    return f"{z.dtype} tensor of shape {tuple(z.shape)}"
