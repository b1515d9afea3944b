"""Edgeworth accountant (Wang, Gao, Zhang, Shen, Su; arXiv 2206.04236), as used by EW-Tune
(Behnia et al., arXiv 2210.15042), for Gaussian / Poisson-subsampled Gaussian / mixture-of-
Gaussians releases and their compositions.

Two quantities, kept apart on purpose
-------------------------------------
* ``epsilon_approximation`` -- the Edgeworth Accountant's *estimate*. Not a bound: it can
  be below the true epsilon. Never report it as a run's epsilon (``is_upper_bound`` does
  not apply to it; the CLI labels it "approximation").
* ``epsilon_bound`` -- a finite-sample *upper bound*: the same accounting identity with
  each CDF replaced by a rigorous band around its normal approximation. At the deltas
  used in practice (<= 1e-4) and T <= 10^5 this band is wider than delta itself, so the
  bound is ``inf`` (vacuous) -- see "Why the bound is usually vacuous".
* ``EdgeworthAccountant.get_epsilon`` (the registered "edgeworth" accountant) reports
  ``max(epsilon_bound, epsilon_PLD)`` when the bound is finite, and falls back to the PLD
  upper bound (dp_accounting, pessimistic) when it is vacuous. Both are proven upper
  bounds, so the reported value is one too, and it is never below PLD.
  `EdgeworthAccountant.epsilon_report` says which one was used (``source``).

The accounting identity (privacy-loss log-likelihood ratios, PLLRs)
-------------------------------------------------------------------
For one release with output laws P (neighbour with the user) and Q (without), the PLLR is
L = log(dP/dQ)(o). Let Y = L with o ~ P and X = L with o ~ Q. For T independent releases
the PLLR of the composition is the sum, and (tight, for the dominating pair)

    delta(eps) = Pr[Y_1+..+Y_T > eps] - e^eps Pr[X_1+..+X_T > eps]
               = 1 - F_Y(eps) - e^eps (1 - F_X(eps))                              (1)

(the hockey-stick divergence written with the PLLR; the Edgeworth Accountant paper derives
it from f-DP, Dong, Roth & Su 2022). Add/remove neighbours give two pairs, "remove"
(P = mixture, Q = N(0, s^2)) and "add" (P = N(0, s^2), Q = mixture); all releases of one
neighbouring pair are in the same direction, so each direction is composed on its own and
the worse epsilon (larger delta) is reported.

Per-release PLLR cumulants (numerical integration)
--------------------------------------------------
A release adds N(0, s^2) noise to a sum whose sensitivity is a random c with
Pr[c = c_i] = p_i (Poisson subsampling: c in {0, 1} with probabilities {1-q, q};
ELS with k examples per user: c = Binomial(k, q); plain Gaussian: c = 1). Then

    remove:  L(x) =  log sum_i p_i exp((2 c_i x - c_i^2) / (2 s^2))
    add:     L(x) = -log sum_i p_i exp((2 c_i x - c_i^2) / (2 s^2))

and x ~ N(0, s^2) or x ~ sum_i p_i N(c_i, s^2). The first four cumulants kappa_1..4 and
the absolute central third moment beta_3 of L under both laws are computed by the
trapezoidal rule on x = m + s z, z in [-40, 40], step 0.004 (spectrally accurate for a
smooth integrand against a Gaussian weight; checked against scipy quad in the tests).
Cumulants add under composition: K_j = sum_t kappa_j^(t).

The Edgeworth approximation (second order, as in the paper's accountant)
------------------------------------------------------------------------
With z = (u - K_1)/sqrt(K_2), g3 = K_3 / K_2^(3/2), g4 = K_4 / K_2^2 and the Hermite
polynomials He2 = z^2 - 1, He3 = z^3 - 3z, He5 = z^5 - 10 z^3 + 15 z,

    F(u) ~= Phi(z) - phi(z) [ g3/6 He2(z) + g4/24 He3(z) + g3^2/72 He5(z) ]       (2)

(the standard expansion to the n^-1 terms, e.g. Hall, "The Bootstrap and Edgeworth
Expansion", 1992, Ch. 2; the paper's accountant uses this order). Plugging (2) for F_X and F_Y into (1) gives delta_hat(eps); ``epsilon_approximation``
is the largest eps with delta_hat(eps) > delta (so a non-monotone delta_hat errs on the
large side). The approximation is 1 - F from (2) with Phi's tail computed as ``norm.sf``.

The finite-sample bound
-----------------------
The Edgeworth Accountant turns (2) into bounds with a uniform error Err_n on each CDF:
delta_upper(eps) = 1 - F_Y(eps) + Err_Y - e^eps (1 - F_X(eps) - Err_X). The explicit
Err_n of its finite-sample theorem could not be checked against the paper text
available offline, so fedsim uses a classical bound whose constant is published and
proven, the Berry-Esseen inequality around the normal approximation:

    sup_u |F(u) - Phi((u - K_1)/sqrt(K_2))| <= C * sum_t beta_3^(t) / K_2^(3/2)    (3)

with C = 0.4748 for identically distributed summands (Shevtsova 2011, arXiv 1111.6554)
and C = 0.5600 otherwise (Shevtsova 2010, Doklady Math. 82). Then, with bands
F_lo = max(0, Phi - Err), F_hi = min(1, Phi + Err) (Err inflated by 0.1% for the
quadrature),

    delta(eps) <= delta_upper(eps) = (1 - F_Y,lo(eps)) - e^eps (1 - F_X,hi(eps))    (4)

and because the true delta(eps) is non-increasing in eps, *any* eps with
delta_upper(eps) <= delta is a valid epsilon; ``epsilon_bound`` returns the smallest such
eps on a fine grid (refined by bisection), or inf if there is none.

Why the bound is usually vacuous
--------------------------------
1 - F_Y,lo(eps) >= Err_Y for every eps, so (4) can only reach delta when Err_Y < delta
(up to the e^eps term). For T identical releases Err_Y = 0.4748 K_3 / sqrt(T) with the
standardised K_3 = beta_3 / kappa_2^(3/2) >= E|N(0,1)|^3 = 1.596 (the plain Gaussian) and
larger for small q and small sigma (5.7 at q = 0.01, sigma = 1). So Err_Y >= 2.4e-3 for
T <= 10^5 (e.g. 0.086 for q = 0.01, sigma = 1, T = 1000) -- far above delta = 1e-5. Any uniform CDF error bound of
order T^(-1/2) or T^(-1) (including the sharper explicit Edgeworth-remainder bounds of
Derumigny, Girard & Guyonvarch, arXiv 2101.05780, which the same structure would accept)
has this problem (a public implementation of the accountant notes in a comment that
"the uniform bound is too large to be timed with e^eps"). So for DP-SGD/FL settings the rigorous Edgeworth bound is informative
only at large delta (e.g. 0.05 with q = 1, T = 10^4); fedsim then falls back to PLD.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from scipy import special, stats

from fedsim.privacy.calibration import log_bisect
from fedsim.privacy.accounting import NO_LOSS, NON_PRIVATE, ReleaseCounter, check_delta, check_positive, pld_accountant

log = logging.getLogger(__name__)

# Berry-Esseen constants (see (3) in the module docstring).
BERRY_ESSEEN_IID = 0.4748  # Shevtsova 2011, identically distributed summands
BERRY_ESSEEN_NON_IID = 0.5600  # Shevtsova 2010, independent, non-identical summands
# Relative slack on the Berry-Esseen error for the quadrature of kappa_2 and beta_3
# (their relative error is ~1e-12; 1e-3 is a generous margin that costs nothing).
_QUADRATURE_SLACK = 1.001

_Z = np.arange(-40.0, 40.0 + 1e-9, 0.004)
_W = stats.norm.pdf(_Z) * 0.004  # trapezoid weights (the end points carry ~1e-350)
_DIRECTIONS = ("remove", "add")


# --- per-release PLLR cumulants -------------------------------------------------------------


@dataclass(frozen=True)
class PllrMoments:
    """Cumulants kappa_1..4 and beta_3 = E|L - kappa_1|^3 of one release's PLLR under one law."""

    k1: float
    k2: float
    k3: float
    k4: float
    beta3: float

    def scaled(self, count: int) -> "PllrMoments":
        """Moments of the sum of `count` iid copies (cumulants and beta_3 sums add)."""
        return PllrMoments(self.k1 * count, self.k2 * count, self.k3 * count, self.k4 * count, self.beta3 * count)

    def __add__(self, other: "PllrMoments") -> "PllrMoments":
        return PllrMoments(
            self.k1 + other.k1, self.k2 + other.k2, self.k3 + other.k3, self.k4 + other.k4, self.beta3 + other.beta3
        )


_ZERO = PllrMoments(0.0, 0.0, 0.0, 0.0, 0.0)


def _pllr(x: np.ndarray, sigma: float, sens: tuple[float, ...], probs: tuple[float, ...], direction: str) -> np.ndarray:
    """L(x) for the mixture mechanism (module docstring), in log-sum-exp form (no overflow)."""
    c = np.asarray(sens)[:, None]
    a = (2.0 * c * x[None, :] - c * c) / (2.0 * sigma * sigma)
    value = special.logsumexp(a, axis=0, b=np.asarray(probs)[:, None])
    return value if direction == "remove" else -value


def _moments_under(law: list[tuple[float, float]], sigma, sens, probs, direction) -> PllrMoments:
    """Moments of L(x) for x ~ sum_j w_j N(m_j, sigma^2), by the trapezoidal rule in z."""
    values, weights = [], []
    for w, m in law:
        if w > 0:
            values.append(_pllr(m + sigma * _Z, sigma, sens, probs, direction))
            weights.append(w * _W)
    v, w = np.concatenate(values), np.concatenate(weights)
    w = w / w.sum()  # the weights sum to 1 - 1e-350; normalise exactly
    k1 = float(np.dot(w, v))
    d = v - k1  # central moments directly: no cancellation for tiny q
    c2, c3, c4 = float(np.dot(w, d**2)), float(np.dot(w, d**3)), float(np.dot(w, d**4))
    return PllrMoments(k1, c2, c3, c4 - 3.0 * c2 * c2, float(np.dot(w, np.abs(d) ** 3)))


@functools.lru_cache(maxsize=4096)
def pllr_moments(
    sigma: float, sens: tuple[float, ...], probs: tuple[float, ...], direction: str
) -> tuple[PllrMoments, PllrMoments]:
    """(moments of Y = L under P, moments of X = L under Q) for one release and one direction.

    remove: P = sum_i p_i N(c_i, s^2), Q = N(0, s^2); add: P = N(0, s^2), Q = the mixture.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}")
    mixture = list(zip(probs, sens))
    base = [(1.0, 0.0)]
    p_law, q_law = (mixture, base) if direction == "remove" else (base, mixture)
    return (
        _moments_under(p_law, sigma, sens, probs, direction),
        _moments_under(q_law, sigma, sens, probs, direction),
    )


# --- events -> parts ------------------------------------------------------------------------

_Part = tuple[float, tuple[float, ...], tuple[float, ...]]  # (sigma, sensitivities, probabilities)


def release_part(event: dp_event.DpEvent):
    """(sigma, sensitivities, probabilities) of one release: a Gaussian (sensitivity 1), a
    Poisson(q)-subsampled Gaussian (0 or 1 with probabilities 1-q, q) or a mixture of Gaussians
    (the ELS step); `NO_LOSS`, `NON_PRIVATE`, or None if unsupported."""
    if isinstance(event, dp_event.GaussianDpEvent):
        sigma, sens, probs = event.noise_multiplier, (1.0,), (1.0,)
    elif isinstance(event, dp_event.MixtureOfGaussiansDpEvent):
        sigma, sens, probs = event.standard_deviation, event.sensitivities, event.sampling_probs
    elif isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.NoOpDpEvent):
        return NO_LOSS
    elif isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        q = float(event.sampling_probability)
        sigma, sens, probs = event.event.noise_multiplier, (0.0, 1.0), (1.0 - q, q)
    else:
        return None
    kept = [(float(c), float(p)) for c, p in zip(sens, probs) if p > 0]
    if all(c == 0.0 for c, _ in kept):  # the output never depends on the user
        return NO_LOSS
    if sigma == 0:
        return NON_PRIVATE
    return float(sigma), tuple(c for c, _ in kept), tuple(p for _, p in kept)


@dataclass(frozen=True)
class ComposedPllr:
    """Summed moments of Y (under P) and X (under Q) for one direction, and the BE constant."""

    y: PllrMoments
    x: PllrMoments
    identically_distributed: bool

    def berry_esseen(self, m: PllrMoments) -> float:
        """Err in (3): sup |F - Phi| for the sum whose moments are `m`."""
        c = BERRY_ESSEEN_IID if self.identically_distributed else BERRY_ESSEEN_NON_IID
        return min(1.0, _QUADRATURE_SLACK * c * m.beta3 / max(m.k2, 1e-300) ** 1.5)


def compose(counts: dict[_Part, int]) -> dict[str, ComposedPllr]:
    """Per direction, the moments of the composed PLLR."""
    out = {}
    for direction in _DIRECTIONS:
        y = x = _ZERO
        for (sigma, sens, probs), n in counts.items():
            my, mx = pllr_moments(sigma, sens, probs, direction)
            y, x = y + my.scaled(n), x + mx.scaled(n)
        out[direction] = ComposedPllr(y, x, identically_distributed=len(counts) == 1)
    return out


# --- tails: Edgeworth approximation and rigorous bands ---------------------------------------


def edgeworth_sf(u, m: PllrMoments) -> np.ndarray:
    """1 - F(u) from the second-order Edgeworth expansion (2). An approximation (may be < 0)."""
    sd = math.sqrt(max(m.k2, 1e-300))
    z = (np.asarray(u, dtype=float) - m.k1) / sd
    g3, g4 = m.k3 / sd**3, m.k4 / sd**4
    he2, he3, he5 = z * z - 1.0, z**3 - 3.0 * z, z**5 - 10.0 * z**3 + 15.0 * z
    return stats.norm.sf(z) + stats.norm.pdf(z) * (g3 / 6.0 * he2 + g4 / 24.0 * he3 + g3 * g3 / 72.0 * he5)


def _exp_times(eps: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """e^eps * tail without inf * 0 (tail >= 0 here, or an approximation that may be < 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.exp(np.minimum(eps, 700.0)) * tail
    return np.where(tail == 0.0, 0.0, out)


def delta_approximation_curve(eps: np.ndarray, c: ComposedPllr) -> np.ndarray:
    """delta_hat(eps) = (1 - F_Y(eps)) - e^eps (1 - F_X(eps)) with (2) for both CDFs."""
    return edgeworth_sf(eps, c.y) - _exp_times(eps, edgeworth_sf(eps, c.x))


def delta_upper_curve(eps: np.ndarray, c: ComposedPllr) -> np.ndarray:
    """delta_upper(eps) of (4): a proven upper bound on delta(eps) at every eps."""
    err_y, err_x = c.berry_esseen(c.y), c.berry_esseen(c.x)
    sd_y, sd_x = math.sqrt(max(c.y.k2, 1e-300)), math.sqrt(max(c.x.k2, 1e-300))
    tail_y_hi = np.minimum(1.0, stats.norm.sf((eps - c.y.k1) / sd_y) + err_y)  # >= 1 - F_Y
    tail_x_lo = np.maximum(0.0, stats.norm.sf((eps - c.x.k1) / sd_x) - err_x)  # <= 1 - F_X
    return np.maximum(0.0, tail_y_hi - _exp_times(eps, tail_x_lo))


def _eps_grid(c: ComposedPllr, points: int = 4001) -> np.ndarray:
    # delta(eps) lives where the Y sum has its upper tail: out to ~6 sd for delta = 1e-9;
    # 60 sd leaves room for skewed Edgeworth tails.
    top = max(1.0, c.y.k1 + 60.0 * math.sqrt(max(c.y.k2, 0.0)))
    return np.linspace(0.0, top, points)


def _eps_from_curve(curve, c: ComposedPllr, delta: float, first_crossing: bool) -> float:
    """Smallest eps with curve <= delta (first_crossing, for the bound: any such eps is valid
    because the true delta(eps) is non-increasing) or the eps past which curve stays <= delta
    (for the approximation, which need not be monotone)."""
    grid = _eps_grid(c)
    vals = curve(grid, c)
    ok = vals <= delta
    if first_crossing:
        if not ok.any():
            return math.inf
        i = int(np.argmax(ok))
    else:
        if not ok[-1]:
            return math.inf
        bad = np.nonzero(~ok)[0]
        if bad.size == 0:
            return 0.0
        i = int(bad[-1]) + 1
    if i == 0:
        return 0.0
    # refine between the failing grid point and the passing one (kept: a point that passes)
    return log_bisect(lambda e: float(curve(np.array([e]), c)[0]) <= delta, float(grid[i]),
                      max(float(grid[i - 1]), 1e-12 * float(grid[i])), rtol=1e-10)


# --- the accountant ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeworthEpsilon:
    """Everything the Edgeworth accountant knows about epsilon at one delta.

    approximation: Edgeworth estimate (not a bound). bound: rigorous Edgeworth/Berry-Esseen
    bound (inf = vacuous). pld: dp_accounting PLD upper bound. reported: what
    `EdgeworthAccountant.epsilon` returns. source: "edgeworth-bound" or "pld-fallback".
    """

    approximation: float
    bound: float
    pld: float
    reported: float
    source: str


class EdgeworthAccountant(ReleaseCounter):
    """Edgeworth Accountant (arXiv 2206.04236); reports a proven upper bound, never the estimate.

    ``get_epsilon`` = max(Edgeworth finite-sample bound, PLD bound) when the former is finite,
    else the PLD bound (fallback, see the module docstring: the bound is vacuous for
    delta below its Berry-Esseen CDF error, i.e. in most DP training settings). So the
    reported epsilon is always a proven upper bound and never below PLD; the same releases
    are composed into a PLD accountant alongside. ``epsilon_approximation`` is the
    accountant's estimate, labelled as such.
    """

    name = "edgeworth"

    def __init__(self, value_discretization_interval: float = 1e-3):  # of the PLD composed alongside
        super().__init__()
        self.pld = pld_accountant(value_discretization_interval)

    def release_key(self, event: dp_event.DpEvent):
        return release_part(event)

    def supports(self, event: dp_event.DpEvent) -> bool:
        return super().supports(event) and self.pld.supports(event)

    def compose(self, event: dp_event.DpEvent, count: int = 1) -> "EdgeworthAccountant":
        super().compose(event, count)
        self.pld.compose(event, count)
        return self

    def _composed(self) -> dict[str, ComposedPllr] | None:
        return None if self.non_private or not self.counts else compose(self.counts)

    def _epsilon_from(self, curve, delta: float, conservative: bool) -> float:
        """Worst epsilon over both directions from a delta(eps) curve (approximate or upper)."""
        check_delta(delta)
        if self.non_private:
            return math.inf
        composed = self._composed()
        if composed is None:
            return 0.0
        return max(_eps_from_curve(curve, c, delta, conservative) for c in composed.values())

    def _delta_from(self, worst_at) -> float:
        if self.non_private:
            return 1.0
        composed = self._composed()
        return 0.0 if composed is None else min(1.0, max(0.0, max(worst_at(c) for c in composed.values())))

    # -- approximation (NOT a bound) --------------------------------------------------------
    def epsilon_approximation(self, delta: float) -> float:
        """Edgeworth estimate of epsilon at `delta` (eq. (1) with (2)); not an upper bound."""
        return self._epsilon_from(delta_approximation_curve, delta, conservative=False)

    def delta_approximation(self, epsilon: float) -> float:
        """Edgeworth estimate of delta at `epsilon`; not an upper bound."""
        return self._delta_from(lambda c: float(delta_approximation_curve(np.array([float(epsilon)]), c)[0]))

    # -- rigorous bound -------------------------------------------------------------------------
    def epsilon_bound(self, delta: float) -> float:
        """Smallest eps with delta_upper(eps) <= delta, eq. (4); inf when the bound is vacuous."""
        return self._epsilon_from(delta_upper_curve, delta, conservative=True)

    def delta_bound(self, epsilon: float) -> float:
        """min over eps' <= epsilon of delta_upper(eps'): valid because delta(.) is non-increasing."""
        grid = np.append(np.linspace(0.0, float(epsilon), 2001), float(epsilon))
        return self._delta_from(lambda c: float(np.min(delta_upper_curve(grid, c))))

    # -- the reported values --------------------------------------------------------------------
    def epsilon_report(self, delta: float) -> EdgeworthEpsilon:
        """Approximation, bound, PLD bound and the reported value (the rule of the class docstring)."""
        bound, pld = self.epsilon_bound(delta), float(self.pld.get_epsilon(delta))
        if math.isfinite(bound):
            reported, source = max(bound, pld), "edgeworth-bound"
        else:
            log.debug("edgeworth bound vacuous at delta=%g; reporting the PLD bound", delta)
            reported, source = pld, "pld-fallback"
        return EdgeworthEpsilon(self.epsilon_approximation(delta), bound, pld, reported, source)

    def _epsilon(self, delta: float) -> float:
        return float(self.epsilon_report(delta).reported)

    def _delta(self, epsilon: float) -> float:
        """max(PLD delta bound, Edgeworth delta bound) at `epsilon`: a proven upper bound. Unlike
        epsilon there is no fallback (a delta bound is always finite), so where the Edgeworth
        bound is vacuous this is much looser than PLD's delta; use "pld" for a tight delta."""
        if epsilon != 0:
            check_positive(epsilon, "epsilon")
        return max(float(self.pld.get_delta(epsilon)), self.delta_bound(epsilon))


class EdgeworthApproximation(EdgeworthAccountant):
    """The Edgeworth *estimate* as an accountant, for comparisons only: ``is_upper_bound =
    False`` and not in `make_accountant`'s registry, so no run can report it; `fedsim account`
    and the bench show (and calibrate against) what EW-Tune reports, labelled as such."""

    name = "edgeworth-approx"
    is_upper_bound = False

    def _epsilon(self, delta: float) -> float:
        return self.epsilon_approximation(delta)

    def _delta(self, epsilon: float) -> float:
        return self.delta_approximation(epsilon)
