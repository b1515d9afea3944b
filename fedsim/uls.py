"""ULS planning: sampling rate, delta, and the calibrated noise mechanism for a run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fedsim.errors import ConfigError
from fedsim.privacy.accounting import compute_epsilon, poisson_gaussian_event
from fedsim.privacy.calibration import calibrate_gaussian_noise_multiplier
from fedsim.privacy.mechanisms import GaussianMechanism, NoiseMechanism

log = logging.getLogger("fedsim")


@dataclass
class UlsPlan:
    num_users: int
    q: float
    delta: float
    rounds: int
    mechanism: NoiseMechanism
    target_epsilon: float | None  # None: non-private run
    planned_epsilon: float  # epsilon after all planned rounds under the run's accountant
    warnings: list[str]
    accountant: str = "pld"  # the accountant that reports epsilon and guards the budget


def default_delta(num_users: int) -> float:
    """min(1e-5, 1 / N^1.1): below 1/N, the usual requirement for a meaningful user-level delta."""
    return min(1e-5, 1.0 / num_users**1.1)


def resolve_delta(cfg, num_users: int) -> tuple[float, list[str]]:
    if cfg.dp.delta is None and (cfg.uls.sampling_rate is not None or cfg.els.sampling_rate is not None):
        # the default delta is a function of N: it would put the population size back into the output
        raise ConfigError("uls.sampling_rate / els.sampling_rate keep N out of the mechanism: set dp.delta"
                          " explicitly too (the default min(1e-5, 1/N^1.1) depends on N)")
    delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(num_users)
    warnings = []
    if delta >= 1.0 / num_users:
        warnings.append(f"dp.delta={delta:g} >= 1/users={1.0 / num_users:g}: a mechanism may then leak one user's data outright")
    return delta, warnings


def sampling_rate(cfg, num_users: int) -> float:
    """q: `uls.sampling_rate` if set, else expected_cohort / N (N, the population size, is then
    treated as public)."""
    if cfg.uls.sampling_rate is not None:
        return cfg.uls.sampling_rate
    q = cfg.uls.expected_cohort / num_users
    if q > 1:
        raise ConfigError(f"uls.expected_cohort={cfg.uls.expected_cohort:g} is larger than the {num_users} users (q={q:.3g} > 1)")
    return q


def plan_uls(cfg, num_users: int, dimension: int | None = None) -> UlsPlan:
    """q, delta and the calibrated mechanism. `dimension` (trainable weights) tightens LMO
    accounting; None is always safe (a dimension-free bound)."""
    q = sampling_rate(cfg, num_users)
    delta, warnings = resolve_delta(cfg, num_users)
    dp, rounds = cfg.dp, cfg.run.rounds
    if dp.mechanism == "lmo":
        from fedsim.privacy.lmo_wiring import plan_lmo  # noqa: PLC0415

        return plan_lmo(cfg, num_users, q, delta, warnings, dimension)
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
        if sigma == 0:
            return UlsPlan(num_users, q, delta, rounds, GaussianMechanism(dp.clip_norm, 0.0), None, math.inf, warnings,
                           dp.accountant)
        eps = compute_epsilon(poisson_gaussian_event(q, sigma, rounds), delta, dp.accountant)
        if dp.epsilon is not None and eps > dp.epsilon:
            raise ConfigError(f"dp.noise_multiplier={sigma:g} gives epsilon={eps:.4g} over {rounds} rounds,"
                              f" above dp.epsilon={dp.epsilon:g}; raise the noise or leave it unset to calibrate")
        target = dp.epsilon if dp.epsilon is not None else eps
        return UlsPlan(num_users, q, delta, rounds, GaussianMechanism(dp.clip_norm, sigma), target, eps, warnings, dp.accountant)
    if dp.epsilon is None:
        raise ConfigError("set dp.epsilon (a budget) or dp.noise_multiplier (0 for a non-private run)")
    sigma = calibrate_gaussian_noise_multiplier(q, rounds, dp.epsilon, delta, dp.accountant)
    eps = compute_epsilon(poisson_gaussian_event(q, sigma, rounds), delta, dp.accountant)
    return UlsPlan(num_users, q, delta, rounds, GaussianMechanism(dp.clip_norm, sigma), dp.epsilon, eps, warnings,
                   dp.accountant)
