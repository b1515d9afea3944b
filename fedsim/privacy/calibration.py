"""Calibration: the parameter that just meets a privacy target, always from the safe side.

One routine, `find_boundary`, serves every search in fedsim (the Gaussian noise multiplier,
the ELS mixture's, the LMO noise scale, the group-privacy example delta): it brackets the
boundary of a monotone predicate by stepping a factor from a guess, then bisects in log
space, and returns a point on the *passing* side.

dp_accounting's `mechanism_calibration` (Brent's method) was tried for sigma and is not used:
a PLD epsilon is a step function of sigma at the scale of its discretisation, so Brent falls
back to bisection; it took 16 accountant calls where the log bisection from the RDP answer
takes 10-11 (smoke config: 8.6 s vs 5.1 s), and it cannot search the non-event parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dp_accounting import dp_event
from dp_accounting import privacy_accountant as dpa

from fedsim.privacy.accounting import check_delta, check_positive, epsilon, make_accountant, poisson_gaussian_event


def log_bisect(passes: Callable[[float], bool], ok: float, bad: float, rtol: float = 1e-3) -> float:
    """Bisection in log space between a point that passes a monotone predicate (`ok`) and one
    that does not (`bad`), in either order; returns a passing point within relative `rtol`."""
    while max(ok, bad) / min(ok, bad) > 1.0 + rtol:
        mid = math.sqrt(ok * bad)
        ok, bad = (mid, bad) if passes(mid) else (ok, mid)
    return ok


def bracket(passes: Callable[[float], bool], guess: float, *, larger_passes: bool,
            bounds: tuple[float, float] = (1e-6, 1e4), factor: float = 2.0) -> tuple[float | None, float | None]:
    """(ok, bad): a passing and a failing point `factor` apart, walking from `guess` within
    `bounds`. ok is None when nothing in bounds passes; bad is None when everything does."""
    lo, hi = bounds
    to_pass = factor if larger_passes else 1.0 / factor
    x = min(max(guess, lo), hi)
    if passes(x):
        ok = x
        while lo <= ok / to_pass <= hi:
            if not passes(ok / to_pass):
                return ok, ok / to_pass
            ok /= to_pass
        return ok, None
    bad = x
    while lo <= bad * to_pass <= hi:
        if passes(bad * to_pass):
            return bad * to_pass, bad
        bad *= to_pass
    return None, bad


def find_boundary(passes: Callable[[float], bool], guess: float, *, larger_passes: bool, rtol: float = 1e-3,
                  bounds: tuple[float, float] = (1e-6, 1e4), factor: float = 2.0) -> float | None:
    """The boundary of a monotone predicate within relative `rtol`, from the passing side;
    None if no point in `bounds` passes, the last passing step if every step in bounds passes."""
    ok, bad = bracket(passes, guess, larger_passes=larger_passes, bounds=bounds, factor=factor)
    if ok is None or bad is None:
        return ok
    return log_bisect(passes, ok, bad, rtol)


def calibrate_noise(
    make_event: Callable[[float], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str | Callable[[], dpa.PrivacyAccountant] = "pld",
    *,
    guess: float | None = None,
    max_noise: float = 1e4,
    rtol: float = 1e-3,
    factor: float | None = None,
) -> float:
    """Smallest noise parameter s (to relative `rtol`, never below the true one) with
    epsilon(make_event(s)) <= target under a fresh accountant (a name or a factory).

    Epsilon decreases in s. `guess` seeds the bracket; by default it comes from the fast RDP
    accountant when it supports the event (RDP is looser, so its answer is an upper end)."""
    check_positive(target_epsilon, "target epsilon")
    check_delta(delta)
    fresh = (lambda: make_accountant(accountant)) if isinstance(accountant, str) else accountant

    def passes(s: float) -> bool:
        return epsilon(fresh(), make_event(s), delta) <= target_epsilon

    factor = factor or 1.25  # a guess from RDP (an upper end) or from a related search: the answer is near
    if guess is None:
        guess, factor = 1.0, 2.0
        if accountant != "rdp" and _integer_order_rdp().supports(make_event(1.0)):
            guess, factor = calibrate_noise(make_event, target_epsilon, delta, _integer_order_rdp, guess=1.0,
                                            rtol=5e-2, factor=2.0), 1.25
    sigma = find_boundary(passes, guess, larger_passes=True, rtol=rtol, bounds=(1e-6, max_noise), factor=factor)
    if sigma is None:
        raise ValueError(f"no noise up to {max_noise:g} meets epsilon={target_epsilon:g} at delta={delta:g};"
                         " raise the budget or lower the number of rounds / sampling rate")
    return sigma


def _integer_order_rdp() -> dpa.PrivacyAccountant:
    """RDP at integer orders only: a few times faster than the default orders (no fractional-order
    series) and looser, so its answer is an upper end. Used for the starting guess only."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant.RdpAccountant(orders=[*range(2, 65), 128, 256])


def calibrate_gaussian_noise_multiplier(q: float, steps: int, target_epsilon: float, delta: float,
                                        accountant: str = "pld") -> float:
    """Noise multiplier sigma for `steps` Poisson(q)-subsampled Gaussian releases."""
    return calibrate_noise(lambda s: poisson_gaussian_event(q, s, steps), target_epsilon, delta, accountant)
