"""Adaptive clipping: the clip norm follows a target quantile of the update norms.

Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS 2021, arXiv 1905.03871), Algorithm 1 with the geometric update:

  each contribution i (a sampled user's delta in ULS, a sampled example's gradient in ELS)
  is clipped to the round's C_t and reports the bit b_i = 1[||x_i|| <= C_t];
  the server releases, beside the noised sum of clipped contributions,
      B = sum_i (b_i - 1/2) + N(0, sigma_b^2)                     (centered bits: sensitivity 1/2)
      b~ = clamp(B / m + 1/2, 0, 1)                                (m: the public expected count)
      C_{t+1} = C_t exp(-eta (b~ - gamma))                         (gamma: the target quantile)

C_{t+1} is a function of released values only: it is public (post-processing), so it is
written in the per-round metrics and the checkpoint and sent to the clients in the clear.

Noise split (the paper, Sec. 3.1): the sum with sensitivity C_t and noise z_delta C_t, and the
count with sensitivity 1/2 and noise sigma_b, released together, are one Gaussian mechanism on
the vector (sum / (z_delta C_t), B / sigma_b), whose sensitivity is

    sqrt(z_delta^-2 + (2 sigma_b)^-2) = 1 / z,    i.e.   z^-2 = z_delta^-2 + z_b^-2,  z_b = 2 sigma_b,

so a round is `PoissonSampledDpEvent(q, GaussianDpEvent(z))` and the run is accounted exactly as
DP-FedAvg with noise multiplier z (no second accountant). Calibration finds z for the budget;
the update then carries z_delta = (z^-2 - z_b^-2)^-1/2 > z, which needs z_b > z. In ELS a user
with m sampled examples shifts the sum by at most m C_t and the centered count by m / 2: the
joint release shifts by m / z in noise units, the same Binomial(k, q) mixture of Gaussians as a
fixed clip with multiplier z (`GaussianMechanism.mixture_event`).

`count_noise_multiplier` is z_b = 2 sigma_b (noise std over the count's sensitivity 1/2).
Flower's `clipped_count_stddev` and tensorflow_privacy's `below_estimate_stddev` are sigma_b;
their default, the paper's, is sigma_b = m / 20 (z_b = m / 10), which `default_count_noise`
gives.
"""

from __future__ import annotations

import math

import torch

from fedsim.privacy.mechanisms import GaussianMechanism
from fedsim.privacy.randomness import RandomStream, snap_to_grid


def default_count_noise(expected_count: float) -> float:
    """z_b = 2 sigma_b with the paper's sigma_b = m / 20 (Andrew et al. 2021, Sec. 4)."""
    return expected_count / 10.0


def update_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """z_delta = (z^-2 - z_b^-2)^-1/2: the update's noise multiplier that keeps the combined one at z.
    Raises ValueError unless z_b > z (the count alone would then need more than the whole budget)."""
    z, zb = float(noise_multiplier), float(count_noise_multiplier)
    if z == 0:  # no noise at all (a non-private reference): nothing to split
        return 0.0
    if not zb > z:
        raise ValueError(f"the count's noise multiplier {zb:.4g} (2 sigma_b) must exceed the combined noise"
                         f" multiplier {z:.4g}; raise dp.adaptive_clip.count_noise_multiplier")
    return (z**-2 - zb**-2) ** -0.5


def combined_noise_multiplier(update_noise: float, count_noise: float) -> float:
    """z = (z_delta^-2 + z_b^-2)^-1/2: the one Gaussian mechanism the update and the count make."""
    return (float(update_noise) ** -2 + float(count_noise) ** -2) ** -0.5


def geometric_update(clip: float, unclipped_fraction: float, target_quantile: float, learning_rate: float) -> float:
    """C exp(-eta (b - gamma)): larger when fewer than gamma of the contributions fit under C."""
    return clip * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


class AdaptiveClipGaussianMechanism(GaussianMechanism):
    """Gaussian noise with an adaptive clip norm. `noise_multiplier` is the combined z (what the
    accountants see, `dp_event` is `GaussianDpEvent(z)`); the update's noise is
    N(0, (z_delta C_t)^2 I); the count's is N(0, sigma_b^2), sigma_b = z_b / 2. `clip_norm` is
    the current C_t; `adapt_clip` releases the count and moves it."""

    name = "gaussian-adaptive-clip"

    def __init__(self, clip_norm: float, noise_multiplier: float, *, target_quantile: float, learning_rate: float,
                 count_noise_multiplier: float, expected_count: float):
        super().__init__(clip_norm, noise_multiplier)
        if not 0 < target_quantile < 1:
            raise ValueError(f"the target quantile must be in (0, 1), got {target_quantile!r}")
        if not learning_rate > 0:
            raise ValueError(f"the clip learning rate must be positive, got {learning_rate!r}")
        if not expected_count > 0:
            raise ValueError(f"the expected count must be positive, got {expected_count!r}")
        self.initial_clip = self.clip_norm
        self.target_quantile, self.learning_rate = float(target_quantile), float(learning_rate)
        self.expected_count = float(expected_count)
        # no noise on the update, none on the count (a non-private reference run)
        self.count_noise_multiplier = float(count_noise_multiplier) if self.noise_multiplier else 0.0
        self.update_noise_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)

    @classmethod
    def around(cls, mechanism: GaussianMechanism, **adaptive) -> AdaptiveClipGaussianMechanism:
        """The adaptive mechanism with `mechanism`'s clip (C_0) and combined noise multiplier z."""
        return cls(mechanism.clip_norm, mechanism.noise_multiplier, **adaptive)

    def noise_label(self) -> str:
        return (f"sigma={self.noise_multiplier:.4g} (update {self.update_noise_multiplier:.4g}, count"
                f" {self.count_noise_multiplier:.4g}), adaptive clip")

    def sample_noise(self, stream: RandomStream, n: int) -> torch.Tensor:
        return stream.normal(n).mul_(self.update_noise_multiplier * self.clip_norm)

    def noise_std(self) -> float:
        return self.update_noise_multiplier * self.clip_norm if self.noise_multiplier else 0.0

    def count_noise_std(self) -> float:
        """sigma_b = z_b / 2: the std of the noise on the count of centered bits."""
        return self.count_noise_multiplier / 2.0

    def adapt_clip(self, unclipped: int, contributions: int, stream: RandomStream) -> dict:
        """Release the noisy unclipped fraction b~ of this round's `contributions` (of which `unclipped`
        had norm <= C_t) and set C_{t+1}. The count's noise is drawn from `stream` in float64 and
        the noisy count rounded to a 2^-16 sigma_b grid, as `add_noise` does for the sum.
        Returns the released metrics: the round's clip C_t, b~ and C_{t+1}."""
        centered = torch.tensor([float(unclipped) - 0.5 * float(contributions)], dtype=torch.float64)
        sigma_b = self.count_noise_std()
        if sigma_b > 0:
            centered = snap_to_grid(stream.normal(1).mul_(sigma_b).add_(centered), sigma_b)
        fraction = min(1.0, max(0.0, float(centered[0]) / self.expected_count + 0.5))
        used = self.clip_norm
        self.clip_norm = geometric_update(used, fraction, self.target_quantile, self.learning_rate)
        return {"clip_norm": used, "noisy_unclipped_frac": fraction, "next_clip_norm": self.clip_norm}

    def state_dict(self) -> dict:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict | None) -> None:
        self.clip_norm = float(state["clip_norm"]) if state else self.initial_clip

    def describe(self) -> dict:
        return {**super().describe(), "clip_norm": self.initial_clip, "noise_std": self.update_noise_multiplier
                * self.initial_clip, "adaptive_clip": {
                    "initial_clip": self.initial_clip, "target_quantile": self.target_quantile,
                    "learning_rate": self.learning_rate, "count_noise_multiplier": self.count_noise_multiplier,
                    "count_noise_std": self.count_noise_std(), "expected_count": self.expected_count,
                    "update_noise_multiplier": self.update_noise_multiplier}}
