"""The statistics of an empirical privacy audit with canaries: pure math (numpy, scipy).

Three published procedures, each as its paper states it; nothing here knows about models.

1. One-run lower bound (rigorous)
---------------------------------
Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv 2305.08846. m canaries, each included independently with probability 1/2. From the
output alone the auditor scores every canary, guesses "included" for the k+ highest scores and
"excluded" for the k- lowest, and abstains on the rest: r = k+ + k- guesses, v of them correct.
Let q = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and

    f(t) = Pr[Binomial(r, q) >= t].

The paper's main theorem for approximate DP (its pure-DP theorem is the case delta = 0)
bounds the number of correct guesses W of any (eps, delta)-DP mechanism:

    Pr[W >= v] <= f(v) + 2 m delta max_{i = 1..m} (f(v - i) - f(v)) / i                (S1)

(for i >= v, f(v - i) = 1, so the max is attained at some i <= v). The right side is the
p-value of the null "the mechanism is (eps, delta)-DP"; the paper's appendix code
(``p_value_DP_audit``) computes it with a running sum of Binomial pmfs, and ``get_eps_audit``
bisects for the audit's eps. `epsilon_lower_bound` returns, at confidence 1 - beta,

    eps_lb = sup { eps >= 0 : p(eps) < beta }                                             (S2)

found by the same bisection, and always returns a point where p < beta was *checked*, so it
is conservative even if (S1) is not monotone in eps (an (eps, delta)-DP mechanism is also
(eps', delta)-DP for every eps' >= eps, so rejecting eps' rejects every smaller eps). 0 means
nothing can be concluded. With probability >= 1 - beta over the canaries' coins (and the
mechanism), eps_lb <= the mechanism's true eps at that delta.

`one_run_audit` tries a fixed, data-independent set of guess counts (k+, k-) and reports the
best. To stay rigorous under that search it splits beta evenly (Bonferroni): every setting is
tested at level beta / len(tried), so with probability >= 1 - beta *no* setting overstates eps.
(The paper's experiments pick the best setting without this correction; ours is the
conservative version.)

2. One-shot empirical epsilon (an estimate, not a bound)
--------------------------------------------------------
Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation for
Federated Learning", ICLR 2024, arXiv 2302.03098 (public code: google-research/federated,
``one_shot_epe/``). Canary clients contribute random unit directions c_j. The statistic of a
canary is the cosine between c_j and

* the final model delta theta_T - theta_0 (final-model threat model); the null distribution,
  the cosine of a random direction never inserted, is N(0, 1/d) in d >= 1000 dimensions
  (the paper's Section 4; the code uses this approximation for d >= 1000), or
* every round's model delta, taking the *maximum over rounds* of the cosine (all-iterates
  threat model; the code's ``max_model_delta_cosines``); its null is the same maximum for
  unseen canaries (directions drawn the same way, never inserted).

(The public code uses the negative cosine because a client update is theta_0 - theta_local,
so the model moves against the canary; any fixed sign works, the epsilon is symmetric.)
Both samples are fit with Gaussians -- N(mu0, sigma0^2) for the null, N(mu1, sigma1^2) for the
canaries; here the maximum-likelihood fit (mean and ``np.std``, ddof = 0) -- and the estimate is
the eps(delta) of that pair, unequal variances included (below). The paper proves it correct
for the Gaussian mechanism as d grows; for other mechanisms it is an estimate.

eps(delta) of two Gaussians. For output laws P, Q the privacy loss is L(y) = log(p(y) / q(y))
and (the hockey-stick divergence; as in the paper's code, after Steinke, "Composition of
Differential Privacy & Privacy Amplification by Subsampling", arXiv 2210.00597)

    delta_{P||Q}(eps) = Pr_{y~P}[L(y) > eps] - e^eps Pr_{y~Q}[L(y) > eps].              (G1)

For P = N(mu_p, s_p^2), Q = N(mu_q, s_q^2), L(y) = a y^2 + b y + c with

    a = 1/(2 s_q^2) - 1/(2 s_p^2),   b = mu_p/s_p^2 - mu_q/s_q^2,
    c = mu_q^2/(2 s_q^2) - mu_p^2/(2 s_p^2) + log(s_q / s_p),                             (G2)

so {L > eps} is a half-line (a = 0), the outside (a > 0) or the inside (a < 0) of the roots
of a y^2 + b y + (c - eps); both probabilities in (G1) are Gaussian masses of that set. The
pair's epsilon is the smallest eps >= 0 with max(delta_{P||Q}, delta_{Q||P})(eps) <= delta
(both directions: add and remove). For s_p = s_q = s it is the analytic Gaussian mechanism
(Balle & Wang, ICML 2018, arXiv 1805.06530) with mu = |mu_p - mu_q| / s:

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).                          (G3)

3. Exposure (Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer", USENIX Security 2019)
-------------------------------------------------------------------------------------------
rank = the canary's position among {canary} + references ordered by loss (log-perplexity),
1 = lowest; exposure = log2 |R| - log2 rank with |R| = 1 + number of references. Ties count
against the canary (rank = 1 + #{references with loss <= the canary's}), the conservative
side. The extrapolated version (the paper's estimate by distribution modelling, also
``compute_exposure_extrapolation`` in TensorFlow Privacy) fits a skew-normal (or normal) law F
to the reference losses and returns -log2 F(canary loss), which can exceed log2 |R|.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "GuessOutcome",
    "OneRunAudit",
    "OneShotEstimate",
    "epsilon_lower_bound",
    "exposure",
    "extrapolated_exposure",
    "gaussian_pair_delta",
    "gaussian_pair_epsilon",
    "one_run_audit",
    "one_run_p_value",
    "one_shot_epsilon",
]

# Fractions of the m canaries guessed on (r / m) that `one_run_audit` tries by default, each as
# k+ = k- = round(fraction * m / 2) (at least 1).
DEFAULT_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

_BISECTION_TOL = 1e-10


# --------------------------------------------------------------------------- validation


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_delta(delta: float, *, allow_zero: bool) -> float:
    ok = isinstance(delta, (int, float)) and math.isfinite(delta)
    ok = ok and ((0.0 <= delta) if allow_zero else (0.0 < delta)) and delta < 1.0
    if not ok:
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"delta must be in {interval}, got {delta!r}")
    return float(delta)


def _check_int(name: str, value: int, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    return int(value)


def _finite_1d(name: str, values, *, min_size: int = 1) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} value(s), got {arr.size}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN (at index {int(np.flatnonzero(np.isnan(arr))[0])})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains an infinite value")
    return arr


# --------------------------------------------------------------------- one-run lower bound


class _BinomialTail:
    """p(eps) of (S1) for fixed (m, r, v, delta): the log binomial coefficients are computed
    once, each eps costs one vector of r + 1 pmf values (evaluated in log space, so it stays
    accurate for large eps, where q rounds to 1)."""

    def __init__(self, m: int, r: int, v: int, delta: float):
        self.m, self.r, self.v, self.delta = m, r, v, delta
        self.k = np.arange(r + 1, dtype=float)
        self.log_choose = (scipy.special.gammaln(r + 1.0) - scipy.special.gammaln(self.k + 1.0)
                           - scipy.special.gammaln(r - self.k + 1.0))
        self.steps = np.arange(1, v + 1, dtype=float)  # i = 1..v

    def p_value(self, eps: float) -> float:
        r, v = self.r, self.v
        if v == 0:
            return 1.0  # f(0) = 1: zero correct guesses are always plausible
        log_q = -np.log1p(np.exp(-eps))            # log(e^eps / (1 + e^eps))
        log_1mq = -eps - np.log1p(np.exp(-eps))    # log(1 / (1 + e^eps))
        pmf = np.exp(self.log_choose + self.k * log_q + (r - self.k) * log_1mq)
        tail = min(1.0, float(pmf[v:].sum()))      # f(v) = Pr[Binomial(r, q) >= v]
        if self.delta == 0.0:
            return tail
        # (f(v - i) - f(v)) = Pr[v - i <= Binomial < v] = pmf[v-1] + ... + pmf[v-i], i = 1..v
        window = np.cumsum(pmf[v - 1::-1])
        alpha = float(np.max(window / self.steps))
        return min(1.0, tail + 2.0 * self.m * self.delta * alpha)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Right side of (S1): an upper bound on Pr[>= v correct of r guesses] for every
    (epsilon, delta)-DP mechanism in the one-run game with m canaries (Steinke et al. 2023)."""
    m, r, v = _check_counts(m, r, v)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return _BinomialTail(m, r, v, _check_delta(delta, allow_zero=True)).p_value(float(epsilon))


def _check_counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    m = _check_int("m (number of canaries)", m, 1)
    r = _check_int("r (number of guesses)", r, 0)
    v = _check_int("v (number of correct guesses)", v, 0)
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    return m, r, v


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The one-run audit's lower bound (S2) on epsilon at this delta (Steinke et al. 2023).

    Every eps below the returned value is rejected: an (eps, delta)-DP mechanism would score
    >= v correct out of r guesses with probability < beta = 1 - confidence (bound (S1)). The
    value is the largest such eps found by bisection (to 1e-10), with p(eps) < beta checked at
    the returned point; 0.0 when even eps = 0 is plausible (e.g. v near r / 2).
    m: canaries (each included w.p. 1/2); r: guesses (abstentions excluded); v: correct ones.
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta, allow_zero=True)
    beta = 1.0 - _check_confidence(confidence)
    p = _BinomialTail(m, r, v, delta).p_value
    if p(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p(lo) < beta <= p(hi)
    while p(hi) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > 2.0**12:  # unreachable: p -> 1 as eps grows (q -> 1)
            return lo
    while hi - lo > _BISECTION_TOL * max(1.0, lo):
        mid = 0.5 * (lo + hi)
        if p(mid) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessOutcome:
    """One tried guess count of a one-run audit: guesses r = k_plus + k_minus, correct v, and
    its eps lower bound at the Bonferroni-split confidence 1 - beta / len(tried)."""

    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class OneRunAudit:
    """Result of `one_run_audit` (Steinke, Nasr, Jagielski 2023; arXiv 2305.08846).

    ``epsilon_lower_bound`` is the best of ``tried``, each tested at level beta / len(tried)
    (beta = 1 - confidence), so it holds at ``confidence`` jointly over the search. The other
    fields describe the setting that achieved it (k_plus "included" guesses on the highest
    scores, k_minus "excluded" guesses on the lowest, ``guesses`` = r, ``correct`` = v).
    """

    epsilon_lower_bound: float
    m: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    tried: tuple[GuessOutcome, ...]


def _default_guess_counts(m: int) -> list[tuple[int, int]]:
    if m < 2:
        return [(1, 0)]
    counts = []
    for fraction in DEFAULT_GUESS_FRACTIONS:
        k = min(m // 2, max(1, round(fraction * m / 2)))
        if (k, k) not in counts:
            counts.append((k, k))
    return counts


def _parse_guess_counts(guess_counts: Iterable[int | Sequence[int]], m: int) -> list[tuple[int, int]]:
    counts: list[tuple[int, int]] = []
    for item in guess_counts:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            pair = (int(item), int(item))
        elif isinstance(item, Sequence) and len(item) == 2:
            pair = (_check_int("k_plus", item[0], 0), _check_int("k_minus", item[1], 0))
        else:
            raise ValueError(f"a guess count is k (k+ = k- = k) or a pair (k_plus, k_minus), "
                             f"got {item!r}")
        if pair[0] < 0 or pair[1] < 0 or not 1 <= pair[0] + pair[1] <= m:
            raise ValueError(f"guess count (k_plus, k_minus) = {pair} needs k_plus, k_minus >= 0 "
                             f"and 1 <= k_plus + k_minus <= m = {m}")
        if pair not in counts:
            counts.append(pair)
    if not counts:
        raise ValueError("guess_counts is empty")
    return counts


def one_run_audit(scores, included, delta: float, confidence: float = 0.95,
                  guess_counts: Iterable[int | Sequence[int]] | None = None) -> OneRunAudit:
    """One-run audit (Steinke et al. 2023: their one-training-run auditor) from canary scores.

    scores: one float per canary, higher = "looks included", computed from the mechanism's
    output alone. included: the secret coins (bool, or 0/1), same length m. delta: the delta
    audited. guess_counts: the (k_plus, k_minus) settings to try (an int k means k+ = k- = k);
    default: k+ = k- = round(f m / 2) for f in DEFAULT_GUESS_FRACTIONS. Fix them before looking
    at the scores: the Bonferroni split (each setting at beta / len(tried)) only covers the
    settings tried. Ties between equal scores are broken by canary index (a function of the
    output only, so the bound stays valid).
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN (at index {int(np.flatnonzero(np.isnan(s))[0])}); "
                         f"every canary needs a score")
    inc = np.asarray(included)
    if inc.ndim != 1 or inc.shape != s.shape:
        raise ValueError(f"scores and included must have the same length, got {s.shape} and "
                         f"{inc.shape}")
    if inc.dtype != bool:
        if not np.isin(inc, (0, 1)).all():
            raise ValueError("included must be a bool array (or 0/1)")
        inc = inc.astype(bool)
    m = _check_int("m (number of canaries)", s.size, 1)
    delta = _check_delta(delta, allow_zero=True)
    confidence = _check_confidence(confidence)
    pairs = _default_guess_counts(m) if guess_counts is None else _parse_guess_counts(guess_counts, m)

    order = np.argsort(s, kind="stable")  # ascending; ties by index
    inc_sorted = inc[order]
    per_setting_confidence = 1.0 - (1.0 - confidence) / len(pairs)
    tried = []
    for k_plus, k_minus in pairs:
        correct = int(inc_sorted[m - k_plus:].sum()) if k_plus else 0
        correct += int((~inc_sorted[:k_minus]).sum())
        r = k_plus + k_minus
        eps = epsilon_lower_bound(m, r, correct, delta, per_setting_confidence)
        tried.append(GuessOutcome(k_plus, k_minus, r, correct, eps))
    best = max(tried, key=lambda t: t.epsilon_lower_bound)  # first of equals
    return OneRunAudit(best.epsilon_lower_bound, m, best.guesses, best.correct, best.k_plus,
                       best.k_minus, confidence, delta, tuple(tried))


# ------------------------------------------------------------------- two Gaussians: eps(delta)


def _log_interval_mass(lo: float, hi: float, mu: float, s: float) -> float:
    """log Pr[lo < Y < hi] for Y ~ N(mu, s^2), accurate in either tail."""
    if not lo < hi:
        return -math.inf
    norm = scipy.stats.norm
    if hi <= mu:  # lower side: cdf(hi) - cdf(lo)
        a, b = norm.logcdf(hi, mu, s), norm.logcdf(lo, mu, s)
    elif lo >= mu:  # upper side: sf(lo) - sf(hi)
        a, b = norm.logsf(lo, mu, s), norm.logsf(hi, mu, s)
    else:
        return math.log1p(-(norm.cdf(lo, mu, s) + norm.sf(hi, mu, s)))
    return -math.inf if b >= a else a + math.log1p(-math.exp(b - a))


def _log_loss_exceeds(eps: float, a: float, b: float, c: float, mu: float, s: float) -> float:
    """log Pr_{y ~ N(mu, s^2)}[a y^2 + b y + c > eps] (the set in (G1) under (G2))."""
    norm = scipy.stats.norm
    if a == 0.0:
        if b == 0.0:
            return 0.0 if c > eps else -math.inf
        t = (eps - c) / b
        return norm.logsf(t, mu, s) if b > 0 else norm.logcdf(t, mu, s)
    cc = c - eps
    disc = b * b - 4.0 * a * cc
    if disc <= 0.0:  # the quadratic keeps the sign of a (up to one point)
        return 0.0 if a > 0 else -math.inf
    root = math.sqrt(disc)
    qq = -0.5 * (b + math.copysign(root, b))  # stable roots: qq / a and cc / qq
    r1, r2 = sorted((qq / a, cc / qq))
    if a > 0:  # outside the roots
        return float(np.logaddexp(norm.logcdf(r1, mu, s), norm.logsf(r2, mu, s)))
    return _log_interval_mass(r1, r2, mu, s)


def _hockey_stick(eps: float, mu_p: float, s_p: float, mu_q: float, s_q: float) -> float:
    """delta_{P||Q}(eps) of (G1) for P = N(mu_p, s_p^2), Q = N(mu_q, s_q^2)."""
    a = 0.5 / s_q**2 - 0.5 / s_p**2
    b = mu_p / s_p**2 - mu_q / s_q**2
    c = 0.5 * mu_q**2 / s_q**2 - 0.5 * mu_p**2 / s_p**2 + math.log(s_q / s_p)
    log_p = _log_loss_exceeds(eps, a, b, c, mu_p, s_p)
    if log_p == -math.inf:
        return 0.0
    log_q = _log_loss_exceeds(eps, a, b, c, mu_q, s_q)
    ratio = eps + log_q - log_p  # log(e^eps Q[E] / P[E])
    return 0.0 if ratio >= 0.0 else math.exp(log_p) * -math.expm1(ratio)


def _check_gaussian(mu0: float, sigma0: float, mu1: float, sigma1: float) -> None:
    for name, value in (("mu0", mu0), ("mu1", mu1), ("sigma0", sigma0), ("sigma1", sigma1)):
        if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if sigma0 <= 0 or sigma1 <= 0:
        raise ValueError(f"standard deviations must be > 0, got sigma0={sigma0}, sigma1={sigma1}")


def gaussian_pair_delta(mu0: float, sigma0: float, mu1: float, sigma1: float,
                        epsilon: float) -> float:
    """max(delta_{P||Q}(eps), delta_{Q||P}(eps)) of (G1) for P = N(mu0, sigma0^2),
    Q = N(mu1, sigma1^2): the smallest delta for which the pair is (eps, delta)-indistinguishable."""
    _check_gaussian(mu0, sigma0, mu1, sigma1)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    mu0, sigma0, mu1, sigma1, epsilon = map(float, (mu0, sigma0, mu1, sigma1, epsilon))
    return max(_hockey_stick(epsilon, mu0, sigma0, mu1, sigma1),
               _hockey_stick(epsilon, mu1, sigma1, mu0, sigma0))


def gaussian_pair_epsilon(mu0: float, sigma0: float, mu1: float, sigma1: float,
                          delta: float) -> float:
    """eps(delta) of the pair N(mu0, sigma0^2) vs N(mu1, sigma1^2), both directions (Andrew et
    al. 2024's estimator, unequal variances included): the smallest eps >= 0 with
    `gaussian_pair_delta` <= delta, by Brent's method (xtol 1e-12) on (G1)-(G2). For
    sigma0 == sigma1 = s this is the analytic Gaussian mechanism (G3) with sensitivity
    |mu1 - mu0| and noise s."""
    _check_gaussian(mu0, sigma0, mu1, sigma1)
    delta = _check_delta(delta, allow_zero=False)
    mu0, sigma0, mu1, sigma1 = map(float, (mu0, sigma0, mu1, sigma1))

    def excess(eps: float) -> float:  # nonincreasing in eps
        return max(_hockey_stick(eps, mu0, sigma0, mu1, sigma1),
                   _hockey_stick(eps, mu1, sigma1, mu0, sigma0)) / delta - 1.0

    if excess(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0.0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError("epsilon of this Gaussian pair exceeds 1e6")
    return float(scipy.optimize.brentq(excess, lo, hi, xtol=1e-12, rtol=4 * np.finfo(float).eps))


# ------------------------------------------------------------------------- one-shot estimate


@dataclass(frozen=True)
class OneShotEstimate:
    """Result of `one_shot_epsilon` (Andrew et al., ICLR 2024; arXiv 2302.03098).

    ``epsilon``: eps(delta) of N(mu0, sigma0^2) (null: cosines of directions never inserted)
    vs N(mu1, sigma1^2) (inserted canaries), both Gaussian maximum-likelihood fits. An
    estimate, not a bound. ``count`` canaries, ``null_count`` null samples (0 when the null is
    the analytic N(0, 1/d) of the final-model threat model).
    """

    epsilon: float
    mu0: float
    sigma0: float
    mu1: float
    sigma1: float
    count: int
    null_count: int
    delta: float


def one_shot_epsilon(canary_scores, null_scores, delta: float, *,
                     dimension: int | None = None) -> OneShotEstimate:
    """One-shot empirical epsilon (Andrew et al. 2024) from canary statistics.

    canary_scores: the statistic of every inserted canary (final model: cosine with the final
    model delta; all iterates: max over rounds of the cosine with each round's model delta).
    null_scores: the same statistic for directions never inserted; or ``None`` with
    ``dimension=d`` for the paper's closed-form final-model null N(0, 1/d) (d >= 1000, where
    the paper's code uses it; not valid for the all-iterates max). Each sample needs >= 2
    values and a positive spread.
    """
    delta = _check_delta(delta, allow_zero=False)
    canary = _finite_1d("canary_scores", canary_scores, min_size=2)
    if null_scores is None:
        if dimension is None:
            raise ValueError("give null_scores, or null_scores=None with dimension=d for the "
                             "closed-form null N(0, 1/d)")
        d = _check_int("dimension", dimension, 1000)
        mu0, sigma0, null_count = 0.0, 1.0 / math.sqrt(d), 0
    else:
        if dimension is not None:
            raise ValueError("give either null_scores or dimension (closed-form null), not both")
        null = _finite_1d("null_scores", null_scores, min_size=2)
        mu0, sigma0, null_count = float(null.mean()), float(null.std()), int(null.size)
    mu1, sigma1 = float(canary.mean()), float(canary.std())
    if sigma0 <= 0 or sigma1 <= 0:
        raise ValueError(f"a fitted standard deviation is 0 (null {sigma0}, canaries {sigma1}): "
                         f"the scores are all equal")
    eps = gaussian_pair_epsilon(mu0, sigma0, mu1, sigma1, delta)
    return OneShotEstimate(eps, mu0, sigma0, mu1, sigma1, int(canary.size), null_count, delta)


# ----------------------------------------------------------------------------------- exposure


def exposure(canary_loss: float, reference_losses) -> float:
    """Exposure of a canary (Carlini et al. 2019): log2 |R| - log2 rank, |R| = 1 + number of
    references, rank = 1 + #{references with loss <= canary_loss} (1 = lowest; ties count
    against the canary). From 0 (no evidence) up to log2 |R|."""
    if not (isinstance(canary_loss, (int, float, np.floating)) and math.isfinite(canary_loss)):
        raise ValueError(f"canary_loss must be a finite number, got {canary_loss!r}")
    refs = _finite_1d("reference_losses", reference_losses)
    rank = 1 + int(np.count_nonzero(refs <= canary_loss))
    return math.log2(1 + refs.size) - math.log2(rank)


def extrapolated_exposure(canary_loss: float, reference_losses,
                          distribution: Literal["skewnorm", "normal"] = "skewnorm") -> float:
    """Exposure by distribution modelling (Carlini et al. 2019; TensorFlow Privacy's
    ``compute_exposure_extrapolation``): -log2 F(canary_loss), F the skew-normal (default) or
    normal law fit by maximum likelihood to the reference losses (>= 3 of them). Not capped
    at log2 |R|, which is its point: it ranks canaries beyond the references sampled."""
    if not (isinstance(canary_loss, (int, float, np.floating)) and math.isfinite(canary_loss)):
        raise ValueError(f"canary_loss must be a finite number, got {canary_loss!r}")
    refs = _finite_1d("reference_losses", reference_losses, min_size=3)
    if refs.std() == 0:
        raise ValueError("reference_losses are all equal: no distribution to fit")
    if distribution == "skewnorm":
        params = scipy.stats.skewnorm.fit(refs)
        log_cdf = float(scipy.stats.skewnorm.logcdf(canary_loss, *params))
    elif distribution == "normal":
        log_cdf = float(scipy.stats.norm.logcdf(canary_loss, refs.mean(), refs.std()))
    else:
        raise ValueError(f"distribution must be 'skewnorm' or 'normal', got {distribution!r}")
    return -log_cdf / math.log(2.0)
