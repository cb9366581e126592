"""Grouped coding length: the feature dimensions split into contiguous channel blocks.

mecqtk's own construction (not in the MEC or MEC-Quant papers). ``normalize="global"`` keeps the
plain form's unit rows, ``lam`` and ``mu`` and replaces ``log det(I_d + lam Z^T Z)`` by the sum of
its diagonal blocks' log-determinants, i.e. it codes the features under a block-diagonal model
that ignores correlations between blocks. By Fischer's inequality that sum is never smaller than
the full log-determinant (for ``z2=None``), with equality when the blocks are uncorrelated.
``normalize="block"`` instead codes each block as an independent unit-norm source: rows are
normalised per block and block ``k`` of width ``d_k`` uses ``lam_k = d_k / (m eps2)`` and
``mu_k = (m + d_k) / 2``. With one group both equal the plain coding length.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mecqtk.mec.coding import check_eps2, coding_length_unit, unit_pair, warmed_eps2
from mecqtk.mec.logdet import log_det_identity_plus

GroupNorm = Literal["global", "block"]


def grouped_coding_length(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    eps2: float,
    groups: int,
    order: int | None = 4,
    normalize: GroupNorm = "global",
) -> Tensor:
    """Return the sum of the coding lengths of ``groups`` contiguous channel blocks, in nats.

    Blocks follow ``torch.tensor_split``: when ``groups`` does not divide ``d`` the first
    ``d % groups`` blocks are one channel wider. All blocks are evaluated in one batched call.

    Args:
        z1: ``(m, d)`` features of the first view.
        z2: ``(m, d)`` second view, or ``None`` for ``z1`` itself.
        eps2: the allowed squared coding error (> 0).
        groups: number of channel blocks, ``1 <= groups <= d``.
        order: Taylor terms, or ``None`` for the exact value.
        normalize: ``"global"`` (block-diagonal model of the plain coding length) or ``"block"``
            (independent unit-norm blocks); see the module docstring.

    Returns:
        A scalar tensor; with ``groups=1`` it equals :func:`coding_length`.

    Example:
        >>> z = torch.randn(128, 512)
        >>> grouped_coding_length(z, eps2=512.0, groups=4).shape
        torch.Size([])
    """
    if normalize not in ("global", "block"):
        raise ValueError(f"normalize must be 'global' or 'block', got {normalize!r}")
    a, b = unit_pair(z1, z2)
    m, d = a.shape
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= d:
        raise ValueError(f"groups must be an integer in [1, d={d}], got {groups!r}")
    eps2 = check_eps2(eps2)
    if normalize == "global":
        lam = d / (m * eps2)
        blocks = log_det_identity_plus(_blocks(a, groups), _blocks(b, groups), lam, order=order)
        return (m + d) / 2 * blocks.sum()
    a = F.normalize(_blocks(z1, groups), dim=-1)
    b = a if z2 is None else F.normalize(_blocks(z2, groups), dim=-1)
    widths = _widths(d, groups, device=z1.device)
    blocks = log_det_identity_plus(a, b, widths / (m * eps2), order=order)
    return ((m + widths) / 2).to(blocks.dtype).mul(blocks).sum()


def grouped_mec_loss(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    eps2: float,
    groups: int,
    order: int | None = 4,
    lam_scale: float = 1.0,
    normalize: GroupNorm = "global",
) -> Tensor:
    """Return ``-grouped_coding_length / coding_length_unit(m, d, eps2 / lam_scale)``.

    With ``normalize="global"`` the first-order term is minus the mean cosine, as for
    :func:`mec_loss`; with one group the two losses are equal.

    Example:
        >>> student, teacher = torch.randn(128, 512), torch.randn(128, 512)
        >>> grouped_mec_loss(student, teacher, eps2=512.0, groups=4).shape
        torch.Size([])
    """
    eps2_now = warmed_eps2(eps2, lam_scale)
    length = grouped_coding_length(
        z1, z2, eps2=eps2_now, groups=groups, order=order, normalize=normalize
    )
    m, d = z1.shape
    return -length / coding_length_unit(m, d, eps2_now)


def _widths(d: int, groups: int, device: torch.device) -> Tensor:
    """Block widths as a float64 tensor built on ``device`` (no host-to-device copy)."""
    base, extra = divmod(d, groups)
    wider = torch.arange(groups, device=device) < extra
    return wider.to(torch.float64) + base


def _blocks(z: Tensor, groups: int) -> Tensor:
    """Return ``(groups, m, max width)`` blocks; narrower blocks are zero-padded.

    Zero columns change neither a block's row norms nor either form of its log-determinant
    (they add zero rows and columns to the d x d Gram and nothing to the m x m one).
    """
    if groups == 1:
        return z.unsqueeze(0)
    parts = torch.tensor_split(z, groups, dim=-1)
    width = parts[0].shape[-1]
    return torch.stack([F.pad(part, (0, width - part.shape[-1])) for part in parts])
