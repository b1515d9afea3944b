"""Noise mechanisms: clip each user's update (`constrain_sensitivity`), noise the sum
(`add_noise`), and describe one release to the accountants (`dp_event`).

Strategies and trainers only use this interface, so a new mechanism (LMO, ...) is a
new subclass and nothing else changes. The split follows pfl-research
(`pfl/privacy/privacy_mechanism.py`): the first verb runs per user, the second on the
aggregate, and both return `(result, metrics)`.

Sensitivity: with add/remove-one-user neighbours and every update clipped to L2 norm
C, the sum of clipped updates changes by at most C in L2.
"""

from __future__ import annotations

import abc
import math

import torch
from dp_accounting import dp_event

from fedsim.privacy.accounting import check_noise_multiplier
from fedsim.privacy.randomness import NOISE_CHUNK, RandomStream, snap_to_grid


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
    return min(1.0, clip_norm / (norm + 1e-6))


def per_user_clip(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale `update` in place to L2 norm <= clip_norm (direction kept). Returns (update, norm before)."""
    norm = update_norm(update)
    factor = clip_factor(norm, clip_norm)
    if factor < 1.0:
        update.mul_(factor)
    return update, norm


class NoiseMechanism(abc.ABC):
    """One central-DP release of a sum of per-user updates clipped to `clip_norm`."""

    name: str = ""

    def __init__(self, clip_norm: float):
        if not clip_norm > 0:
            raise ValueError(f"clip norm must be positive, got {clip_norm!r}")
        self.clip_norm = float(clip_norm)

    def constrain_sensitivity(self, update: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clip one user's update (in place) to L2 norm <= C."""
        update, norm = per_user_clip(update, self.clip_norm)
        return update, {"norm_before_clip": norm, "clipped": float(norm > self.clip_norm)}

    @abc.abstractmethod
    def sample_noise(self, stream: RandomStream, n: int) -> torch.Tensor:
        """n noise values (float64, CPU) for a sum of clipped updates, already scaled by C,
        drawn from `stream` (a `SecretRandomness` keystream: the only source of noise)."""

    def add_noise(self, aggregate: torch.Tensor, stream: RandomStream) -> tuple[torch.Tensor, dict]:
        """Add noise to the (clipped) sum, in place: per chunk, noise + sum in float64, rounded
        to a grid of 2^-16 noise std (floating-point hardening, `privacy/randomness.py`), cast
        back. Chunks keep the extra memory O(chunk) for any number of coordinates.

        Returns (aggregate, released metrics): the noise std and the expected noise norm
        std * sqrt(d) (root-mean-square), never the realised noise or signal norm."""
        flat = aggregate.view(-1)
        std, grid_scale = self.noise_std(), self.grid_scale()
        released = {"noise_std": std, "expected_noise_norm": std * math.sqrt(flat.numel())}
        if grid_scale == 0:  # non-private reference run: nothing to draw
            return aggregate, released
        for start in range(0, flat.numel(), NOISE_CHUNK):
            part = flat[start:start + NOISE_CHUNK]
            y = self.sample_noise(stream, part.numel()).add_(part.detach().to("cpu", torch.float64))
            part.copy_(snap_to_grid(y, grid_scale))
        return aggregate, released

    @abc.abstractmethod
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise on the sum."""

    def grid_scale(self) -> float:
        """A finite, positive scale of the noise (0: no noise) that sets the rounding grid of
        `add_noise`; the std unless a mechanism's std can be infinite."""
        return self.noise_std()

    @abc.abstractmethod
    def dp_event(self) -> dp_event.DpEvent:
        """One (unsampled) release of a sensitivity-C sum, for the accountants."""

    def describe(self) -> dict:
        return {"mechanism": self.name, "clip_norm": self.clip_norm, "noise_std": self.noise_std()}


class GaussianMechanism(NoiseMechanism):
    """z ~ N(0, (sigma C)^2 I) added to the sum; the noise multiplier is sigma = std / C."""

    name = "gaussian"

    def __init__(self, clip_norm: float, noise_multiplier: float):
        super().__init__(clip_norm)
        if noise_multiplier != 0:
            check_noise_multiplier(noise_multiplier, "noise_multiplier")
        self.noise_multiplier = float(noise_multiplier)

    def sample_noise(self, stream: RandomStream, n: int) -> torch.Tensor:
        return stream.normal(n).mul_(self.noise_multiplier * self.clip_norm)

    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def dp_event(self) -> dp_event.DpEvent:
        if self.noise_multiplier == 0:
            return dp_event.NonPrivateDpEvent()
        return dp_event.GaussianDpEvent(self.noise_multiplier)

    def describe(self) -> dict:
        return {**super().describe(), "noise_multiplier": self.noise_multiplier}
