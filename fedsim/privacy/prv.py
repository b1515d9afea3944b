"""PRV accountant: numerical composition of privacy random variables (Gopi, Lee, Wutschitz 2021).

Wraps ``prv_accountant`` 0.2.0 (Microsoft), the reference implementation of "Numerical
Composition of Differential Privacy", Gopi, Lee & Wutschitz, NeurIPS 2021, arXiv 2106.02848.
For a pair of output distributions (P, Q) of one release the privacy random variable (PRV) is
Y = log(P(o)/Q(o)) with o ~ P. Composition adds independent PRVs, so the PRV of T releases is
the T-fold convolution, computed by FFT on a truncated, discretised domain; then
delta(eps) = E[(1 - e^(eps - Y))_+]. Theorem 5.5 of the paper chooses the mesh from ``eps_error``
and ``delta_error`` so that the library's ``compute_epsilon`` returns (lower, estimate, upper)
with lower <= eps_true <= upper. fedsim reports **upper**.

Neighbouring relation (add/remove one user) and directions
----------------------------------------------------------
For a Poisson(q)-subsampled Gaussian with noise multiplier sigma (sensitivity 1):

* remove: P = (1-q) N(0, s^2) + q N(1, s^2),  Q = N(0, s^2)
          -> ``prv_accountant.PoissonSubsampledGaussianMechanism`` (the library's PRV);
* add:    P = N(0, s^2),  Q = (1-q) N(0, s^2) + q N(1, s^2)
          -> `_PoissonSubsampledGaussianAdd` below (Y = -log(1 - q + q e^{(2x-1)/(2 s^2)}),
          x ~ N(0, s^2), bounded above by -log(1-q)).

The library accounts only for the first. A user-level guarantee must hold for both neighbour
orders, so by default both are composed and the larger epsilon (delta) is reported, as
dp_accounting's PLD does for ADD_OR_REMOVE_ONE. ``q = 1`` is the plain Gaussian mechanism,
whose PRV is symmetric (``prv_accountant.GaussianMechanism``).

Supported events: ``GaussianDpEvent``, ``PoissonSampledDpEvent(q, GaussianDpEvent)``, their
``SelfComposedDpEvent`` / ``ComposedDpEvent`` (heterogeneous q and sigma), ``NoOpDpEvent``
(epsilon 0) and ``NonPrivateDpEvent`` (epsilon inf). Anything else (e.g. the ELS mixture of
Gaussians) raises ``UnsupportedEventError``: use the PLD accountant.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from scipy import special

from fedsim.compat import prv_accountant_internals
from fedsim.privacy.accounting import NO_LOSS, NON_PRIVATE, ReleaseCounter, check_delta, check_positive


@dataclass(frozen=True)
class PrvBounds:
    """(lower, estimate, upper) from the PRV accountant; only ``upper`` is a reportable bound."""

    lower: float
    estimate: float
    upper: float
    #: the eps_error actually used (larger than requested when the mesh had to be coarsened)
    eps_error: float = 0.0


class _PoissonSubsampledGaussianAdd:
    """PRV Y(x) of the *add* direction of the Poisson-subsampled Gaussian (module docstring).

    Y <= t iff x >= x0(t) = s^2 log((e^{-t} - (1 - q)) / q) + 1/2 when e^{-t} > 1 - q, and
    always otherwise, so  F(t) = Phi_bar(x0(t) / s)  for t < -log(1-q), and 1 above."""

    pm_inf = 0.0  # no probability mass at +inf (the loss is bounded above by -log(1-q))

    def __init__(self, sampling_probability: float, noise_multiplier: float):
        self.q = float(sampling_probability)
        self.sigma = float(noise_multiplier)

    def cdf(self, t):
        t = np.asarray(t, dtype=np.float64)
        q, s = self.q, self.sigma
        # e^{-t} - (1 - q) = q + expm1(-t): no cancellation for small q and t
        gap = q + np.expm1(-np.minimum(t, 700.0))
        below = gap > 0
        x0 = s * s * np.log(np.where(below, gap, 1.0) / q) + 0.5
        return np.where(below, special.ndtr(-x0 / s), 1.0)

    def probability(self, a, b):
        return self.cdf(b) - self.cdf(a)

    def rdp(self, alpha: float) -> float:
        # Only sizes the truncated domain (RDP tail bounds). The subsampled Gaussian's Renyi
        # divergence is larger in the remove direction (Mironov, Talwar & Zhang 2019, arXiv
        # 1908.10530), so the remove-direction RDP is a valid (conservative) bound here too.
        return _sgm_rdp(self.q, self.sigma, float(alpha))


@functools.lru_cache(maxsize=65536)
def _sgm_rdp(q: float, sigma: float, alpha: float) -> float:
    """The library's subsampled-Gaussian RDP of order alpha, memoised: the library evaluates
    ~150 orders in pure Python per domain sizing (0.4 s per (q, sigma), 85% of a T=100 call),
    which runs twice per direction and again for every sigma calibration tries at one q."""
    return float(prv_accountant_internals().PoissonSubsampledGaussianMechanism(q, sigma).rdp(alpha))


def _make_prv_classes():
    # Imported lazily: prv_accountant pulls scipy.signal; the CLI stays fast.
    from scipy import integrate

    prv = prv_accountant_internals()

    class AddPrv(_PoissonSubsampledGaussianAdd, prv.PrivacyRandomVariable):
        pass

    class RemovePrv(prv.PoissonSubsampledGaussianMechanism):
        def rdp(self, alpha: float) -> float:
            return _sgm_rdp(float(self.p), float(self.sigma), float(alpha))

    class TruncatedPrv(prv.PrivacyRandomVariableTruncated):
        """The library's truncation, whose ``mean`` integrates E[Y] = [tF] - int F dt with quad
        between fixed break points, plus the kink where the support ends (log(1-q) for remove,
        -log(1-q) for add) as a break point. Just off a break point quad misses the sliver (q=0.1,
        sigma=0.6, add: a mean 4e-4 too small, failing the library's check |mean shift| < mesh/2
        for small delta_error); with it the mean is right to ~1e-9 (vs direct integration in x)."""

        def __init__(self, prv, t_min: float, t_max: float, kinks: tuple[float, ...] = ()):
            super().__init__(prv, t_min, t_max)
            self.kinks = tuple(k for k in kinks if t_min < k < t_max)

        def mean(self) -> float:
            base = [-1e-1, -1e-2, -1e-3, -1e-4, -1e-5, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
            points = sorted({self.t_min, self.t_max, *[p for p in base if self.t_min < p < self.t_max], *self.kinks})
            m = 0.0
            for left, right in zip(points[:-1], points[1:]):
                integral, _ = integrate.quad(self.cdf, left, right, limit=500)
                m += right * self.cdf(right) - left * self.cdf(left) - integral
            return float(m)

    return prv.GaussianMechanism, RemovePrv, AddPrv, TruncatedPrv


def _mesh(eps_error: float, n: list[int], delta_error: float) -> float:
    """The mesh of Theorem 5.5 (arXiv 2106.02848), as in ``PRVAccountant.__init__``."""
    return eps_error / math.sqrt(sum(n) / 2 * math.log(12 / delta_error))


def _compose(prvs, kinks, n: list[int], eps_error: float, delta_error: float):
    """The composed, discretised PRV: the steps of ``PRVAccountant.__init__`` and ``compute_composition``
    (domain from Remark 5.6, mesh from Theorem 5.5, cell-centred discretisation, FFT
    self-composition, convolution tree), with `TruncatedPrv` for the library's truncation."""
    lib = prv_accountant_internals()
    *_, truncated = _make_prv_classes()
    half_width = lib.compute_safe_domain_size(prvs, n, eps_error=eps_error, delta_error=delta_error)
    domain = lib.Domain.create_aligned(-half_width, half_width, _mesh(eps_error, n, delta_error))
    tprvs = [truncated(p, domain.t_min(), domain.t_max(), k) for p, k in zip(prvs, kinks)]
    dprvs = [lib.discretisers.CellCentred().discretise(t, domain) for t in tprvs]
    return lib.composers.Heterogeneous(dprvs).compute_composition(num_self_compositions=list(n))


class PrvAccountant(ReleaseCounter):
    """Gopi et al. 2021 PRV accountant (``prv_accountant`` 0.2.0); reports the *upper* bound.

    Args:
      eps_error: the library's epsilon error budget (Theorem 5.5): ``upper - lower <= 2 eps_error``
        plus the delta error; time and memory grow like 1/eps_error.
      delta_error_ratio: delta error budget as a fraction of the target delta (the library's
        ``Accountant`` uses 1e-3).
      both_directions: compose add and remove and report the worse (see the module docstring).
      max_domain_points: cap on the domain. `_mesh` over [-L, L], L from an RDP tail bound, needs
        10^7+ points (gigabytes) for large T or epsilon (q=0.1, sigma=0.6, T=10^5 was OOM-killed
        here); above the cap eps_error is raised until the domain fits: still an upper bound,
        only looser, and `PrvBounds.eps_error` says which error was used.
    """

    name = "prv"

    def __init__(self, eps_error: float = 0.01, delta_error_ratio: float = 1e-3, both_directions: bool = True,
                 max_domain_points: int = 3_000_000):
        if not (eps_error > 0 and 0 < delta_error_ratio < 1 and max_domain_points >= 1000):
            raise ValueError("eps_error must be > 0, delta_error_ratio in (0, 1), max_domain_points >= 1000")
        super().__init__()
        self.eps_error = float(eps_error)
        self.delta_error_ratio = float(delta_error_ratio)
        self.both_directions = bool(both_directions)
        self.max_domain_points = int(max_domain_points)

    def release_key(self, event: dp_event.DpEvent):
        """(q, sigma) of a (Poisson-subsampled) Gaussian release; q = 1 for the plain Gaussian."""
        q = 1.0
        if isinstance(event, dp_event.PoissonSampledDpEvent):
            q, event = float(event.sampling_probability), event.event
            if q == 0.0 or isinstance(event, dp_event.NoOpDpEvent):
                return NO_LOSS
        if not isinstance(event, dp_event.GaussianDpEvent):
            return None
        return NON_PRIVATE if event.noise_multiplier == 0 else (q, float(event.noise_multiplier))

    def _fit_eps_error(self, prvs, n: list[int], delta_error: float) -> float:
        """The smallest eps_error >= self.eps_error whose domain has <= max_domain_points."""
        compute_safe_domain_size = prv_accountant_internals().compute_safe_domain_size
        eps_error = self.eps_error
        for _ in range(4):  # L depends on eps_error only through max(L, eps_error): converges fast
            half_width = compute_safe_domain_size(prvs, n, eps_error=eps_error, delta_error=delta_error)
            points = 2 * half_width / _mesh(eps_error, n, delta_error)
            if points <= self.max_domain_points:
                return eps_error
            eps_error *= points / self.max_domain_points * 1.01
        return float(eps_error)

    def _composed(self, delta_error: float):
        """The composed discrete PRV of each direction: [(prv, eps_error used), ...]."""
        gaussian, remove_prv, add_prv, _ = _make_prv_classes()
        keys = sorted(self.counts)
        n = [self.counts[k] for k in keys]
        # (prvs, kinks): the remove PRV's support starts at log(1-q), the add PRV's ends at
        # -log(1-q). The break point is nudged 1e-9 (relative) inside the support: exactly at
        # the edge the library's closed-form cdf evaluates log(0) and returns NaN.
        edge = [math.log1p(-q) * (1 - 1e-9) if q < 1.0 else -math.inf for q, _ in keys]
        directions = [([gaussian(s) if q == 1.0 else remove_prv(q, s) for q, s in keys], [(k,) for k in edge])]
        if self.both_directions and any(q < 1.0 for q, _ in keys):
            directions.append(([gaussian(s) if q == 1.0 else add_prv(q, s) for q, s in keys], [(-k,) for k in edge]))
        out = []
        for prvs, kinks in directions:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")  # overflow notes from the RDP domain sizing
                eps_error = self._fit_eps_error(prvs, n, delta_error)
                out.append((_compose(prvs, kinks, n, eps_error, delta_error), eps_error))
        return out

    def _bounds(self, delta_error: float, top: float, triple) -> PrvBounds:
        """The worst over the directions of each of `triple(prv, eps_error)` = (lower, estimate,
        upper), clipped to [0, top]; `top` is also the value of a non-private release."""
        if self.non_private:
            return PrvBounds(top, top, top)
        if not self.counts:
            return PrvBounds(0.0, 0.0, 0.0)
        lo = est = up = -math.inf
        used = self.eps_error
        for f_n, eps_error in self._composed(delta_error):
            with np.errstate(all="ignore"):
                l_, e_, u_ = triple(f_n, eps_error)
            lo, est, up, used = max(lo, l_), max(est, e_), max(up, u_), max(used, eps_error)
        # the epsilon estimate can dip below 0 for nearly private-for-free events (tiny q, huge sigma)
        clip = lambda v: min(max(v, 0.0), top)  # noqa: E731
        return PrvBounds(clip(lo), clip(est), clip(up), used)

    def epsilon_bounds(self, delta: float) -> PrvBounds:
        """(lower, estimate, upper) epsilon at `delta` of what was composed."""
        check_delta(delta)
        delta_error = delta * self.delta_error_ratio

        def triple(f_n, eps_error):
            try:  # DiscretePrivacyRandomVariable.compute_epsilon: estimate -/+ the error budgets
                return f_n.compute_epsilon(delta, delta_error, eps_error)
            except (ValueError, RuntimeError) as exc:  # e.g. delta below float resolution
                raise ValueError(f"the prv accountant cannot resolve delta={delta:g}: {exc}") from None

        return self._bounds(delta_error, math.inf, triple)

    def delta_bounds(self, epsilon: float, delta_error: float = 1e-12) -> PrvBounds:
        """(lower, estimate, upper) delta at `epsilon`; `delta_error` is absolute here."""
        if epsilon != 0:
            check_positive(epsilon, "epsilon")
        # as PRVAccountant.compute_delta: delta(eps -/+ eps_error) +/- delta_error
        return self._bounds(delta_error, 1.0, lambda f_n, e: (
            float(f_n.compute_delta_estimate(epsilon + e)) - delta_error, float(f_n.compute_delta_estimate(epsilon)),
            float(f_n.compute_delta_estimate(epsilon - e)) + delta_error))

    def _epsilon(self, delta: float) -> float:
        return float(self.epsilon_bounds(delta).upper)

    def _delta(self, epsilon: float) -> float:
        return float(self.delta_bounds(epsilon).upper)
