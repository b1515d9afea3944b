"""Edgeworth accountant (Wang, Gao, Zhang, Shen, Su; arXiv 2206.04236), as used by EW-Tune
(Behnia et al., arXiv 2210.15042), for Gaussian / Poisson-subsampled Gaussian / mixture-of-
Gaussians releases and their compositions.

Two quantities, kept apart on purpose
-------------------------------------
* ``epsilon_approximation``: the Edgeworth Accountant's *estimate*, possibly below the true
  epsilon, so never a run's epsilon (the CLI labels it "approximation").
* ``epsilon_bound``: a finite-sample *upper bound*, each CDF replaced by a rigorous band around
  its normal approximation; ``inf`` (vacuous) at delta <= 1e-4 for T <= 10^5 (see below).
* ``get_epsilon`` of the registered "edgeworth" accountant: ``max(epsilon_bound, epsilon_PLD)``
  when the bound is finite, else the PLD upper bound (dp_accounting, pessimistic): always a
  proven upper bound, never below PLD; `EdgeworthAccountant.epsilon_report` says which.

The accounting identity (privacy-loss log-likelihood ratios, PLLRs)
-------------------------------------------------------------------
For one release with output laws P (neighbour with the user) and Q (without), the PLLR is
L = log(dP/dQ)(o). Let Y = L with o ~ P and X = L with o ~ Q. For T independent releases
the PLLR of the composition is the sum, and (tight, for the dominating pair)

    delta(eps) = Pr[Y_1+..+Y_T > eps] - e^eps Pr[X_1+..+X_T > eps]
               = 1 - F_Y(eps) - e^eps (1 - F_X(eps))                              (1)

(the hockey-stick divergence written with the PLLR; the paper derives it from f-DP, Dong,
Roth & Su 2022). Add/remove neighbours give two pairs, "remove" (P = mixture, Q = N(0, s^2))
and "add" (P = N(0, s^2), Q = mixture); all releases of one neighbouring pair go the same
way, so each direction is composed on its own and the worse epsilon (larger delta) reported.

Per-release PLLR cumulants (numerical integration)
--------------------------------------------------
A release adds N(0, s^2) noise to a sum whose sensitivity is a random c with
Pr[c = c_i] = p_i (Poisson subsampling: c in {0, 1} with probabilities {1-q, q};
ELS with k examples per user: c = Binomial(k, q); plain Gaussian: c = 1). Then

    remove:  L(x) =  log sum_i p_i exp((2 c_i x - c_i^2) / (2 s^2))
    add:     L(x) = -log sum_i p_i exp((2 c_i x - c_i^2) / (2 s^2))

and x ~ N(0, s^2) or x ~ sum_i p_i N(c_i, s^2). The cumulants kappa_1..4 and the absolute
central third moment beta_3 of L under both laws come from the trapezoidal rule on
x = m + s z, z in [-40, 40], step 0.004 (spectrally accurate for a smooth integrand against a
Gaussian weight; checked against scipy quad in the tests). They add: K_j = sum_t kappa_j^(t).

The Edgeworth approximation (second order, as in the paper's accountant)
------------------------------------------------------------------------
With z = (u - K_1)/sqrt(K_2), g3 = K_3 / K_2^(3/2), g4 = K_4 / K_2^2 and the Hermite
polynomials He2 = z^2 - 1, He3 = z^3 - 3z, He5 = z^5 - 10 z^3 + 15 z,

    F(u) ~= Phi(z) - phi(z) [ g3/6 He2(z) + g4/24 He3(z) + g3^2/72 He5(z) ]       (2)

(the expansion to the n^-1 terms, e.g. Hall, "The Bootstrap and Edgeworth Expansion", 1992,
Ch. 2). (2) for F_X and F_Y in (1) gives delta_hat(eps), with Phi's tail as ``norm.sf``;
``epsilon_approximation`` is the eps past which delta_hat stays <= delta (a non-monotone
delta_hat errs on the large side).

The finite-sample bound
-----------------------
The Edgeworth Accountant turns (2) into bounds with a uniform error Err_n on each CDF. The
explicit Err_n of its finite-sample theorem could not be checked against the paper text
available offline, so fedsim uses a classical bound with a published, proven constant, the
Berry-Esseen inequality around the normal approximation:

    sup_u |F(u) - Phi((u - K_1)/sqrt(K_2))| <= C * sum_t beta_3^(t) / K_2^(3/2)    (3)

with C = 0.4748 for identically distributed summands (Shevtsova 2011, arXiv 1111.6554) and
C = 0.5600 otherwise (Shevtsova 2010, Doklady Math. 82). With the bands
F_lo = max(0, Phi - Err), F_hi = min(1, Phi + Err) (Err inflated by 0.1% for the quadrature),

    delta(eps) <= delta_upper(eps) = (1 - F_Y,lo(eps)) - e^eps (1 - F_X,hi(eps))    (4)

and as the true delta(eps) is non-increasing in eps, *any* eps with delta_upper(eps) <= delta
is a valid epsilon; ``epsilon_bound`` returns the smallest such eps on a fine grid (refined
by bisection), or inf if there is none.

Why the bound is usually vacuous
--------------------------------
1 - F_Y,lo(eps) >= Err_Y for every eps, so (4) can only reach delta when Err_Y < delta (up to
the e^eps term). For T identical releases Err_Y = 0.4748 K_3 / sqrt(T) with the standardised
K_3 = beta_3 / kappa_2^(3/2) >= E|N(0,1)|^3 = 1.596 (the plain Gaussian; 5.7 at q = 0.01,
sigma = 1): Err_Y >= 2.4e-3 for T <= 10^5 (0.086 at q = 0.01, sigma = 1, T = 1000), far above
delta = 1e-5. Every uniform CDF error bound of order T^(-1/2) or T^(-1) shares this, the
sharper Edgeworth-remainder bounds of Derumigny, Girard & Guyonvarch (arXiv 2101.05780) too (a
public implementation notes "the uniform bound is too large to be timed with e^eps"). So in
DP-SGD/FL the bound informs only at large delta (0.05 with q = 1, T = 10^4); else PLD reports.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import astuple, dataclass

import numpy as np
from dp_accounting import dp_event
from scipy import special, stats

from fedsim.privacy.accounting import NO_LOSS, NON_PRIVATE, ReleaseCounter, check_delta, check_positive, pld_accountant
from fedsim.privacy.calibration import log_bisect

log = logging.getLogger(__name__)

BERRY_ESSEEN_IID = 0.4748  # C of (3): Shevtsova 2011, identically distributed summands
BERRY_ESSEEN_NON_IID = 0.5600  # Shevtsova 2010, independent, non-identical summands
_QUADRATURE_SLACK = 1.001  # on Err, for the quadrature of kappa_2 and beta_3 (relative error ~1e-12)

_Z = np.arange(-40.0, 40.0 + 1e-9, 0.004)
_W = stats.norm.pdf(_Z) * 0.004  # trapezoid weights (the end points carry ~1e-350)
_DIRECTIONS = ("remove", "add")


@dataclass(frozen=True)
class PllrMoments:
    """Cumulants kappa_1..4 and beta_3 = E|L - kappa_1|^3 of one release's PLLR under one law."""

    k1: float
    k2: float
    k3: float
    k4: float
    beta3: float

    def plus(self, other: PllrMoments, count: int) -> PllrMoments:
        """Moments of this sum plus `count` iid copies of `other` (cumulants and beta_3 add)."""
        return PllrMoments(*(a + b * count for a, b in zip(astuple(self), astuple(other))))

    @property
    def sd(self) -> float:
        return math.sqrt(max(self.k2, 1e-300))

    def z(self, u) -> np.ndarray:  # the argument of Phi in (2) and (3)
        return (np.asarray(u, dtype=float) - self.k1) / self.sd


def _moments_under(law: list[tuple[float, float]], sigma, sens, probs, direction) -> PllrMoments:
    """Moments of L(x) for x ~ sum_j w_j N(m_j, sigma^2), by the trapezoidal rule in z."""
    c, p = np.asarray(sens)[:, None], np.asarray(probs)[:, None]
    values, weights = [], []
    for w, m in law:
        if w > 0:  # L(x) in log-sum-exp form (no overflow)
            x = m + sigma * _Z
            value = special.logsumexp((2.0 * c * x[None, :] - c * c) / (2.0 * sigma * sigma), axis=0, b=p)
            values.append(value if direction == "remove" else -value)
            weights.append(w * _W)
    v, w = np.concatenate(values), np.concatenate(weights)
    w = w / w.sum()  # the weights sum to 1 - 1e-350; normalise exactly
    k1 = float(np.dot(w, v))
    d = v - k1  # central moments directly: no cancellation for tiny q
    c2, c3, c4 = float(np.dot(w, d**2)), float(np.dot(w, d**3)), float(np.dot(w, d**4))
    return PllrMoments(k1, c2, c3, c4 - 3.0 * c2 * c2, float(np.dot(w, np.abs(d) ** 3)))


@functools.lru_cache(maxsize=4096)
def pllr_moments(sigma: float, sens: tuple, probs: tuple, direction: str) -> tuple[PllrMoments, PllrMoments]:
    """(moments of Y = L under P, moments of X = L under Q) for one release and one direction."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}")
    mixture, base = list(zip(probs, sens)), [(1.0, 0.0)]
    p_law, q_law = (mixture, base) if direction == "remove" else (base, mixture)
    return tuple(_moments_under(law, sigma, sens, probs, direction) for law in (p_law, q_law))


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


def compose(counts: dict[tuple, int]) -> dict[str, ComposedPllr]:
    """Per direction, the moments of the composed PLLR; `counts` {(sigma, sens, probs): times}."""
    out = {}
    for direction in _DIRECTIONS:
        y = x = PllrMoments(0.0, 0.0, 0.0, 0.0, 0.0)
        for part, n in counts.items():
            my, mx = pllr_moments(*part, direction)
            y, x = y.plus(my, n), x.plus(mx, n)
        out[direction] = ComposedPllr(y, x, identically_distributed=len(counts) == 1)
    return out


def edgeworth_sf(u, m: PllrMoments) -> np.ndarray:
    """1 - F(u) from the second-order Edgeworth expansion (2). An approximation (may be < 0)."""
    z, g3, g4 = m.z(u), m.k3 / m.sd**3, m.k4 / m.sd**4
    he2, he3, he5 = z * z - 1.0, z**3 - 3.0 * z, z**5 - 10.0 * z**3 + 15.0 * z
    return stats.norm.sf(z) + stats.norm.pdf(z) * (g3 / 6.0 * he2 + g4 / 24.0 * he3 + g3 * g3 / 72.0 * he5)


def _exp_times(eps: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """e^eps * tail without inf * 0 (tail >= 0 here, or an approximation that may be < 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.exp(np.minimum(eps, 700.0)) * tail
    return np.where(tail == 0.0, 0.0, out)


def delta_approximation_curve(eps: np.ndarray, c: ComposedPllr) -> np.ndarray:
    """delta_hat(eps): (1) with (2) for both CDFs."""
    return edgeworth_sf(eps, c.y) - _exp_times(eps, edgeworth_sf(eps, c.x))


def delta_upper_curve(eps: np.ndarray, c: ComposedPllr) -> np.ndarray:
    """delta_upper(eps) of (4): a proven upper bound on delta(eps) at every eps."""
    tail_y_hi = np.minimum(1.0, stats.norm.sf(c.y.z(eps)) + c.berry_esseen(c.y))  # >= 1 - F_Y
    tail_x_lo = np.maximum(0.0, stats.norm.sf(c.x.z(eps)) - c.berry_esseen(c.x))  # <= 1 - F_X
    return np.maximum(0.0, tail_y_hi - _exp_times(eps, tail_x_lo))


def _eps_from_curve(curve, c: ComposedPllr, delta: float, first_crossing: bool) -> float:
    """Smallest eps with curve <= delta (first_crossing, for the bound: the true delta(eps) is
    non-increasing) or the eps past which curve stays <= delta (the approximation need not be)."""
    # delta(eps) lives where the Y sum has its upper tail: out to ~6 sd for delta = 1e-9;
    # 60 sd leaves room for skewed Edgeworth tails.
    grid = np.linspace(0.0, max(1.0, c.y.k1 + 60.0 * math.sqrt(max(c.y.k2, 0.0))), 4001)
    ok = curve(grid, c) <= delta
    if first_crossing:
        i = int(np.argmax(ok)) if ok.any() else None
    else:
        bad = np.nonzero(~ok)[0]
        i = (int(bad[-1]) + 1 if bad.size else 0) if ok[-1] else None
    if i is None:
        return math.inf
    if i == 0:
        return 0.0
    # refine between the failing grid point and the passing one (kept: a point that passes)
    return log_bisect(lambda e: float(curve(np.array([e]), c)[0]) <= delta, float(grid[i]),
                      max(float(grid[i - 1]), 1e-12 * float(grid[i])), rtol=1e-10)


@dataclass(frozen=True)
class EdgeworthEpsilon:
    """Everything the Edgeworth accountant knows about epsilon at one delta: the estimate (not a
    bound), the rigorous bound (inf = vacuous), the PLD bound, the reported value and its source
    ("edgeworth-bound" or "pld-fallback")."""

    approximation: float
    bound: float
    pld: float
    reported: float
    source: str


class EdgeworthAccountant(ReleaseCounter):
    """Edgeworth Accountant (arXiv 2206.04236) reporting a proven upper bound, never the estimate
    (the rule in the module docstring); the same releases are composed into a PLD alongside."""

    name = "edgeworth"
    release_key = staticmethod(release_part)

    def __init__(self, value_discretization_interval: float = 1e-3):  # of the PLD composed alongside
        super().__init__()
        self.pld = pld_accountant(value_discretization_interval)

    def supports(self, event: dp_event.DpEvent) -> bool:
        return super().supports(event) and self.pld.supports(event)

    def compose(self, event: dp_event.DpEvent, count: int = 1) -> EdgeworthAccountant:
        super().compose(event, count)
        self.pld.compose(event, count)
        return self

    def _epsilon_from(self, curve, delta: float, first_crossing: bool) -> float:
        """Worst epsilon over both directions from a delta(eps) curve (approximate or upper)."""
        check_delta(delta)
        if self.non_private or not self.counts:
            return math.inf if self.non_private else 0.0
        return max(_eps_from_curve(curve, c, delta, first_crossing) for c in compose(self.counts).values())

    def _delta_from(self, worst_at) -> float:
        if self.non_private or not self.counts:
            return 1.0 if self.non_private else 0.0
        return min(1.0, max(0.0, max(worst_at(c) for c in compose(self.counts).values())))

    def epsilon_approximation(self, delta: float) -> float:
        """Edgeworth estimate of epsilon at `delta` ((1) with (2)); NOT an upper bound."""
        return self._epsilon_from(delta_approximation_curve, delta, first_crossing=False)

    def delta_approximation(self, epsilon: float) -> float:
        """Edgeworth estimate of delta at `epsilon`; NOT an upper bound."""
        return self._delta_from(lambda c: float(delta_approximation_curve(np.array([float(epsilon)]), c)[0]))

    def epsilon_bound(self, delta: float) -> float:
        """Smallest eps with delta_upper(eps) <= delta, eq. (4); inf when the bound is vacuous."""
        return self._epsilon_from(delta_upper_curve, delta, first_crossing=True)

    def delta_bound(self, epsilon: float) -> float:
        """min over eps' <= epsilon of delta_upper(eps'): valid because delta(.) is non-increasing."""
        grid = np.append(np.linspace(0.0, float(epsilon), 2001), float(epsilon))
        return self._delta_from(lambda c: float(np.min(delta_upper_curve(grid, c))))

    def epsilon_report(self, delta: float) -> EdgeworthEpsilon:
        """Approximation, bound, PLD bound and the reported value."""
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
        """max(PLD delta bound, Edgeworth delta bound): a proven upper bound. Unlike epsilon there
        is no fallback (a delta bound is always finite), so where the Edgeworth bound is vacuous
        this is much looser than PLD's delta; use "pld" for a tight delta."""
        if epsilon != 0:
            check_positive(epsilon, "epsilon")
        return max(float(self.pld.get_delta(epsilon)), self.delta_bound(epsilon))


class EdgeworthApproximation(EdgeworthAccountant):
    """The Edgeworth *estimate* as an accountant, for comparisons only (`fedsim account` and the bench
    show what EW-Tune reports): not an upper bound, not in `make_accountant`'s registry."""

    name = "edgeworth-approx"
    is_upper_bound = False

    def _epsilon(self, delta: float) -> float:
        return self.epsilon_approximation(delta)

    def _delta(self, epsilon: float) -> float:
        return self.delta_approximation(epsilon)
