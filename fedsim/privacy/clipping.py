"""Per-user (and per-example) L2 clipping: the sensitivity half of a mechanism, the only part
a worker runs. It imports torch and nothing of the accountants, so a cohort worker (a Ray actor)
does not load dp_accounting and scipy (~90 MB per process, bench/ray_memory.py)."""

from __future__ import annotations

import math

import torch

from fedsim.privacy import sabotage


def update_norm(update: torch.Tensor) -> float:
    """L2 norm of an update, accumulated in float64 (torch's float32 CPU vector_norm is 0.75%
    low at 85M entries). NaN if the update has a NaN; inf if it has an inf -- or if squaring a
    huge float32 entry overflowed, which the float64 fallback then resolves."""
    norm = float(update.float().pow(2).sum(dtype=torch.float64).sqrt())
    if math.isinf(norm) and bool(torch.isfinite(update).all()):
        norm = float(torch.linalg.vector_norm(update.double()))
    return norm


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / (norm + 1e-6)): the Opacus factor; the clipped update is strictly inside the ball."""
    if sabotage.active("no-clip"):  # the audit's self-test only (fedsim/privacy/sabotage.py)
        return 1.0
    return min(1.0, clip_norm / (norm + 1e-6))


def per_user_clip(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale `update` in place to L2 norm <= clip_norm (direction kept). Returns (update, norm before)."""
    norm = update_norm(update)
    factor = clip_factor(norm, clip_norm)
    if factor < 1.0:
        update.mul_(factor)
    return update, norm
