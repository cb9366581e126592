"""Maximum entropy coding (MEC) regulariser: coding lengths, losses and warm-up schedules.

The plain coding length and loss follow Liu et al., "Self-Supervised Learning via Maximum
Entropy Coding" (NeurIPS 2022). The grouped and mixture forms are mecqtk's own designs, made for
the mixture-of-experts idea of MEC-Quant (arXiv 2509.15514), whose formulas are not public.
docs/mec.md has the derivations and the choice of ``eps2``.

Example:
    >>> import torch
    >>> from mecqtk.mec import mec_loss
    >>> student, teacher = torch.randn(128, 64), torch.randn(128, 64)
    >>> mec_loss(student, teacher, eps2=64.0).shape
    torch.Size([])
"""

from __future__ import annotations

from mecqtk.mec.coding import coding_length, coding_length_unit, mec_loss, taylor_radius_bound
from mecqtk.mec.grouped import grouped_coding_length, grouped_mec_loss
from mecqtk.mec.logdet import log_det_identity_plus
from mecqtk.mec.mixture import MixtureCodingLength
from mecqtk.mec.schedule import MECSchedule, gamma_warmup, lam_warmup_scale

__all__ = [
    "MECSchedule",
    "MixtureCodingLength",
    "coding_length",
    "coding_length_unit",
    "gamma_warmup",
    "grouped_coding_length",
    "grouped_mec_loss",
    "lam_warmup_scale",
    "log_det_identity_plus",
    "mec_loss",
    "taylor_radius_bound",
]
