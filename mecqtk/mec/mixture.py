"""Mixture-of-experts coding length: a trainable gate splits the batch into soft components.

mecqtk's own design: MEC-Quant (arXiv 2509.15514) names a mixture-of-experts MEC objective for
long-tailed data, but its formulas are not available. Here a linear gate gives each
sample a soft membership ``p_ik`` (softmax over K experts) and expert ``k`` codes the
membership-weighted batch with its own effective size ``m_k = sum_i p_ik``::

    L_mix = sum_k mu_k * log det(I_d + lam_k * Z2^T P_k Z1),  lam_k = d / (m_k eps2),
    mu_k = (m_k + d) / 2,  P_k = diag(p_1k, ..., p_mk).

``lam_k Z^T P_k Z = (d / eps2) * (weighted covariance of component k)``: every component is
coded at its own scale, and its ``d / 2`` share of ``mu_k`` does not shrink with its mass, so a
small (tail) component's spread counts about as much as the head's. With one expert ``p = 1``
and ``L_mix`` is the plain coding length.

The two parties pull in different directions:

* the encoder maximises ``L_mix`` with the memberships held fixed (spread within every component);
* the gate minimises the mass-weighted coding rate ``R = sum_k (m_k / m) log det(I + lam_k
  Z1^T P_k Z1)`` of the detached student features: the compression term of MCR^2 (Yu et al.,
  2020) with learned instead of labelled memberships. By concavity of ``log det`` (and of the
  even-order series) ``R`` never exceeds the whole batch's value, attained when the gate
  collapses onto one expert or spreads every sample uniformly; any split into components with
  different covariances lowers it, so the gate is pushed away from both degenerate states
  towards grouping samples of similar direction, and a distinct minority gets its own expert.
  No load-balancing term is needed for that, and none is added: an unused expert is harmless.
  (Letting the gate maximise ``L_mix``, or minimise it with an MDL membership cost, collapses it
  onto one expert in the regime where the series converges; docs/mec.md has the measurements.)

Both gradients come out of one scalar, so a training loop treats it like any other loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mecqtk.mec.coding import check_eps2, coding_length_unit, unit_pair, warmed_eps2
from mecqtk.mec.logdet import log_det_identity_plus

MASS_FLOOR = 1e-4
"""Smallest effective size ``m_k`` used in ``lam_k``; keeps an emptied expert finite."""


class MixtureCodingLength(nn.Module):
    """Soft mixture of ``experts`` MEC coding lengths with a trainable linear gate.

    The gate sees the detached, row-normalised student features ``z1``. Its weights keep
    PyTorch's random initialisation on purpose: with identical experts the uniform gate is a
    symmetric stationary point that zero weights would never leave. Put this module's
    parameters in the optimiser together with the network's.

    Args:
        experts: number of mixture components K (>= 1).
        dim: feature width d of ``z1``.
        eps2: the allowed squared coding error (> 0) at the end of the lam warm-up.
        order: Taylor terms, or ``None`` for the exact log-determinant.

    Example:
        >>> mixture = MixtureCodingLength(experts=4, dim=64, eps2=64.0)
        >>> student, teacher = torch.randn(128, 64), torch.randn(128, 64)
        >>> loss = mixture.loss(student, teacher, lam_scale=0.5)
        >>> loss.backward()  # trains the network through `student` and the gate
    """

    def __init__(self, experts: int, dim: int, *, eps2: float, order: int | None = 4) -> None:
        super().__init__()
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
            raise ValueError(f"experts must be a positive integer, got {experts!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.experts = experts
        self.dim = dim
        self.eps2 = check_eps2(eps2)
        self.order = order
        self.gate = nn.Linear(dim, experts)

    def memberships(self, z1: Tensor) -> Tensor:
        """Return the ``(m, K)`` soft memberships of the rows of ``z1`` (no gradient to ``z1``)."""
        return torch.softmax(self.gate(F.normalize(z1.detach(), dim=-1)), dim=-1)

    def forward(self, z1: Tensor, z2: Tensor | None = None, *, lam_scale: float = 1.0) -> Tensor:
        """Return the mixture coding length ``L_mix`` at ``eps2 / lam_scale``, in nats.

        The value is ``L_mix``; its gradient is ``dL_mix/dz`` for the features and
        ``-mu * dR/dtheta`` for the gate (``mu = (m + d) / 2``), so whatever maximises the
        returned value trains the gate to minimise ``R``.
        """
        a, b = self._views(z1, z2)
        eps2 = warmed_eps2(self.eps2, lam_scale)
        p = self.memberships(a)
        length = self._mixture_length(a, b, p.detach(), eps2)
        if self.experts == 1 or not (self.training and torch.is_grad_enabled()):
            return length
        m, d = a.shape
        gate_term = -(m + d) / 2 * self._compression_rate(a.detach(), p, eps2)
        # Zero in value, so the number reported is L_mix; the gradient trains the gate.
        return length + (gate_term - gate_term.detach())

    def loss(self, z1: Tensor, z2: Tensor | None = None, *, lam_scale: float = 1.0) -> Tensor:
        """Return ``-L_mix / coding_length_unit(m, d, eps2 / lam_scale)``, the loss to minimise."""
        length = self(z1, z2, lam_scale=lam_scale)
        m, d = z1.shape
        return -length / coding_length_unit(m, d, warmed_eps2(self.eps2, lam_scale))

    def compression_rate(self, z1: Tensor, *, lam_scale: float = 1.0) -> Tensor:
        """Return the gate's objective ``R = sum_k (m_k / m) log det(I + lam_k Z1^T P_k Z1)``.

        Differentiable in the gate's parameters only; useful to watch the gate's progress.
        """
        a = self._views(z1, None)[0].detach()
        return self._compression_rate(a, self.memberships(a), warmed_eps2(self.eps2, lam_scale))

    def _compression_rate(self, a: Tensor, p: Tensor, eps2: float) -> Tensor:
        mass = p.sum(0)
        log_dets = self._component_log_dets(a, a, p, mass, eps2)
        return (mass / a.shape[0]).mul(log_dets).sum()

    def _mixture_length(self, a: Tensor, b: Tensor, p: Tensor, eps2: float) -> Tensor:
        d = a.shape[1]
        mass = p.sum(0)
        log_dets = self._component_log_dets(a, b, p, mass, eps2)
        return ((mass + d) / 2).mul(log_dets).sum()

    def _component_log_dets(
        self, a: Tensor, b: Tensor, p: Tensor, mass: Tensor, eps2: float
    ) -> Tensor:
        m, d = a.shape
        # lam_k = d / (m_k eps2) written as lam * (m / m_k): exactly lam when m_k = m (K = 1).
        lam = (d / (m * eps2)) * (m / mass.clamp_min(MASS_FLOOR))
        # det(I + lam P A B^T) = det(I + lam sqrt(P) A B^T sqrt(P)): weighting one side by p
        # avoids sqrt's infinite slope at p = 0 and lets all experts share one Gram matrix.
        return log_det_identity_plus(a, b, lam, order=self.order, row_weights=p.mT)

    def _views(self, z1: Tensor, z2: Tensor | None) -> tuple[Tensor, Tensor]:
        a, b = unit_pair(z1, z2)
        if a.shape[1] != self.dim:
            raise ValueError(f"features have {a.shape[1]} dims but the gate expects {self.dim}")
        return a, b

    def extra_repr(self) -> str:
        return f"experts={self.experts}, dim={self.dim}, eps2={self.eps2}, order={self.order}"
