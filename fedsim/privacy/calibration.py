"""Calibration: the smallest noise that meets a target (epsilon, delta).

The search is a bisection on the noise parameter that always returns the *upper*
end of the final bracket, so the returned value is guaranteed (under the chosen
accountant) to meet the target: calibration may over-noise by `rtol`, never under.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dp_accounting import dp_event

from fedsim.errors import ConfigError
from fedsim.privacy.accounting import (
    Accountant,
    check_delta,
    check_epsilon,
    make_accountant,
    poisson_gaussian_event,
)


def log_bisect(is_ok: Callable[[float], bool], ok: float, bad: float, rtol: float = 1e-3) -> float:
    """Bisection in log space between a point that satisfies a monotone predicate (`ok`) and one
    that does not (`bad`), in either order; returns an `ok` point within relative `rtol` of the
    boundary. Returning the `ok` end is what makes calibration err on the safe side."""
    while max(ok, bad) / min(ok, bad) > 1.0 + rtol:
        mid = math.sqrt(ok * bad)
        if is_ok(mid):
            ok = mid
        else:
            bad = mid
    return ok


def calibrate_noise(
    make_event: Callable[[float], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: Accountant | str = "pld",
    *,
    guess: float | None = None,
    max_upper: float = 1e4,
    rtol: float = 1e-3,
) -> float:
    """Smallest noise parameter s (up to relative `rtol`) with eps(make_event(s)) <= target.

    Assumes epsilon decreases in s (true for a noise multiplier). `guess` seeds the
    bracket; by default it comes from the fast RDP accountant when it supports the event
    (RDP is looser than PLD, so the RDP answer is an upper end for PLD). Tiny noise makes
    PLD slow, so the bracket is kept near the answer.
    """
    check_epsilon(target_epsilon, "target epsilon")
    check_delta(delta)
    acc = make_accountant(accountant) if isinstance(accountant, str) else accountant

    def eps(s: float) -> float:
        return acc.epsilon(make_event(s), delta)

    if guess is None:
        guess = 1.0
        rdp = make_accountant("rdp")
        if acc.name != "rdp" and rdp.supports(make_event(1.0)):
            guess = calibrate_noise(make_event, target_epsilon, delta, rdp, guess=1.0, rtol=1e-2)
    upper, lower = guess, guess / 1.5

    # Grow the bracket until the upper end meets the target.
    while eps(upper) > target_epsilon:
        lower, upper = upper, upper * 2.0
        if upper > max_upper:
            raise ConfigError(
                f"no noise up to {max_upper:g} meets epsilon={target_epsilon:g} at delta={delta:g};"
                " raise the budget or lower the number of rounds / sampling rate"
            )
    # Shrink the lower end until it fails (or is tiny).
    while lower > 1e-6 and eps(lower) <= target_epsilon:
        upper, lower = lower, lower / 2.0
    # invariant: eps(upper) <= target < eps(lower)
    return log_bisect(lambda s: eps(s) <= target_epsilon, upper, lower, rtol)


def calibrate_gaussian_noise_multiplier(
    q: float, steps: int, target_epsilon: float, delta: float, accountant: Accountant | str = "pld"
) -> float:
    """Noise multiplier sigma for `steps` Poisson(q)-subsampled Gaussian releases."""
    return calibrate_noise(
        lambda s: poisson_gaussian_event(q, s, steps), target_epsilon, delta, accountant
    )
