"""Warm-up schedules for the MEC term: pure functions of the step, so they are easy to test.

Two things warm up. ``lam`` starts at ``lam * lam_start`` (1/8 in the reference implementation of
Liu et al.) so the Taylor series starts well inside its convergence region, and rises to ``lam``.
The reference moves ``1/lam`` linearly (``np.linspace(8/lam, 1/lam, ...)``), which is the same as
``eps2`` falling linearly from ``eps2 / lam_start`` to ``eps2``; mecqtk does the same. The loss
weight ``gamma`` rises linearly from 0 so the regulariser does not jolt a freshly quantized
network in its first steps (mecqtk's choice; the reference has no weight, MEC is its only loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lam_warmup_scale(step: int, warmup_steps: int, start: float = 0.125) -> float:
    """Return the factor on ``lam`` at ``step``: ``start`` at step 0, 1 from ``warmup_steps`` on.

    ``1 / factor`` moves linearly from ``1 / start`` to 1, as in the reference implementation.

    Example:
        >>> lam_warmup_scale(0, 100), lam_warmup_scale(50, 100), lam_warmup_scale(100, 100)
        (0.125, 0.2222222222222222, 1.0)
    """
    _check_step(step)
    _check_steps("warmup_steps", warmup_steps)
    if not 0 < start <= 1:
        raise ValueError(f"start must lie in (0, 1], got {start!r}")
    if step >= warmup_steps:
        return 1.0
    progress = step / warmup_steps
    return 1.0 / (1.0 / start + (1.0 - 1.0 / start) * progress)


def gamma_warmup(step: int, warmup_steps: int, gamma: float) -> float:
    """Return the MEC loss weight at ``step``: linear from 0 to ``gamma`` over ``warmup_steps``.

    Example:
        >>> gamma_warmup(0, 10, 0.5), gamma_warmup(5, 10, 0.5), gamma_warmup(20, 10, 0.5)
        (0.0, 0.25, 0.5)
    """
    _check_step(step)
    _check_steps("warmup_steps", warmup_steps)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite non-negative number, got {gamma!r}")
    if step >= warmup_steps:
        return float(gamma)
    return gamma * step / warmup_steps


@dataclass(frozen=True)
class MECSchedule:
    """Step-indexed weight and ``lam`` factor of the MEC term.

    Attributes:
        gamma: weight of the MEC loss after its warm-up (>= 0).
        gamma_warmup_steps: optimiser steps over which the weight rises from 0 (0 = none).
        lam_warmup_steps: steps over which ``lam`` rises from ``lam_start * lam`` (0 = none).
        lam_start: initial factor on ``lam``, in (0, 1].

    Example:
        >>> schedule = MECSchedule(gamma=0.5, gamma_warmup_steps=100, lam_warmup_steps=400)
        >>> schedule.weight(50), schedule.lam_scale(0)
        (0.25, 0.125)
    """

    gamma: float
    gamma_warmup_steps: int = 0
    lam_warmup_steps: int = 0
    lam_start: float = 0.125

    def __post_init__(self) -> None:
        # Building the schedule validates it: evaluate both curves once.
        gamma_warmup(0, self.gamma_warmup_steps, self.gamma)
        lam_warmup_scale(0, self.lam_warmup_steps, self.lam_start)

    def weight(self, step: int) -> float:
        """Return the MEC loss weight at optimiser step ``step`` (0-based)."""
        return gamma_warmup(step, self.gamma_warmup_steps, self.gamma)

    def lam_scale(self, step: int) -> float:
        """Return the factor on ``lam`` at optimiser step ``step`` (0-based)."""
        return lam_warmup_scale(step, self.lam_warmup_steps, self.lam_start)


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")


def _check_steps(name: str, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")
