"""Offline search for LMO-DP noise parameters (arXiv 2405.18776, "offline optimal noise search").

`search` returns the LMO parameters with the best objective (smallest per-coordinate variance,
smallest E|noise|, or largest P(|noise| <= gamma)) among those that **meet the target** (epsilon,
delta) for `steps` Poisson(q)-subsampled releases in `dimension` coordinates under the chosen
accountant: ``"lmo_faithful"`` (the upper bound fedsim budgets with) or ``"paper"`` (the paper's
per-step accounting, reproduced for comparison; not an upper bound).

1. *Shape and scale.* Scaling t by c divides the noise by c: every objective improves and
   epsilon grows with c, so for a *shape* (the law of t up to scale) the best admissible point
   is the largest c that meets the target. The search is over shapes only.
2. *Grid.* The paper's grid (:func:`paper_grid`) is screened with a cheap proxy (faithful: the
   scale at which the high-dimension bound alpha*I/2 per step meets the target; paper: exact);
   the best few shapes are calibrated exactly.
3. *Refinement.* Nelder-Mead on the log of the shape ratios (Gamma shape, Exp mean / Gamma
   scale, uniform width and offset / Gamma scale), each point calibrated.
4. *Verification.* The final parameters are re-checked with the accountant itself and their
   scale set to the largest it confirms. An infeasible result is never returned.

The result cache and progress display are passed in (`fedsim.lmo_search` has both).
"""

from __future__ import annotations

import itertools
import math
import time
from types import SimpleNamespace

import attr
import numpy as np
from scipy import optimize, special

from fedsim.privacy.accounting import check_delta, check_positive, check_sampling_rate, check_steps
from fedsim.privacy.calibration import calibrate_gaussian_noise_multiplier, find_boundary
from fedsim.privacy.lmo.faithful import (SPARSE_ORDERS, ball_bound, check_dimension, divergence_table,
                                          faithful_els_epsilon, faithful_epsilon)
from fedsim.privacy.lmo.paper import PAPER_VARIANTS, paper_epsilon
from fedsim.privacy.lmo.params import LmoParams
from fedsim.privacy.mechanisms import binomial_pmf
from fedsim.privacy.subsampled_rdp import (generic_rdp_gaussian_els_epsilon, generic_rdp_gaussian_epsilon,
                                          mixture_subsampled_rdp, rdp_to_epsilon, subsampled_rdp)

SEARCH_VERSION = 2  # bump when the search or the accountant changes (invalidates cached results)
OBJECTIVES = ("variance", "magnitude", "usefulness")
ACCOUNTANTS = ("lmo_faithful", "paper")
GRIDS = ("coarse", "full", "minimal")
#: The paper's own accounting used by `accountant="paper"`: the per-step variant of their search.
PAPER_SEARCH_VARIANT = "per_step"

_PAPER_G_THETA_K = [(1, 2), (2, 2), (3, 2), (5, 1), (9, 0.5), (7.5, 1), (0.5, 1)]
_PAPER_E_LAMBDA = [0.1, 0.5, 1, 5]
_PAPER_U_B_A = [(1, 0), (2, 1)]


def _from_json(v) -> float:
    return math.inf if v is None else float(v)


def _to_json(_instance, _field, v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


@attr.s(auto_attribs=True)
class LmoSearchResult:
    """The searched parameters and everything needed to compare them (noise in units of C).
    Infinite values (an infinite noise variance, say) are None in JSON."""

    params: LmoParams = attr.ib(converter=lambda p: p if isinstance(p, LmoParams) else LmoParams.from_dict(p))
    setting: dict
    noise_std: float = attr.ib(converter=_from_json)
    expected_magnitude: float = attr.ib(converter=_from_json)
    usefulness: float
    epsilon_faithful: float = attr.ib(converter=_from_json)
    epsilon_paper: dict = attr.ib(converter=lambda d: {k: _from_json(v) for k, v in d.items()})
    gaussian: dict
    objective_value: float = attr.ib(converter=_from_json)
    search: dict = attr.Factory(dict)

    dimension = property(lambda self: self.setting.get("dimension"))

    def to_dict(self) -> dict:
        return attr.asdict(self, value_serializer=_to_json)

    @classmethod
    def from_dict(cls, d: dict) -> "LmoSearchResult":
        return cls(**{f.name: d[f.name] for f in attr.fields(cls) if f.name in d})


def _shape_from_vector(y: np.ndarray) -> LmoParams:
    """y = (log G_k, log(Exp mean / Gamma scale), log(U width / Gamma scale), log(U_a / Gamma scale)),
    Gamma scale 1 (the overall scale is calibrated separately)."""
    k = float(np.exp(np.clip(y[0], math.log(0.05), math.log(1e3))))
    e, w, lo = (float(np.exp(np.clip(v, -30, 30))) for v in y[1:])
    lo = min(lo, 1e6 * w)  # keep the uniform's width >= 1e-6 of its offset
    return LmoParams(a1=1.0, a3=1.0, a4=1.0, G_k=k, G_theta=1.0, E_lambda=1.0 / e, U_a=lo, U_b=lo + w)


def canonical(p: LmoParams) -> LmoParams:
    """The same noise written with G_theta = 1, E_lambda = 1, U_b = 1: the weights a1, a3, a4 are
    then the scales of the Gamma, Exponential and Uniform parts of t."""
    out = LmoParams(a1=p.a1 * p.G_theta, a3=p.a3 / p.E_lambda, a4=p.a4 * p.U_b, G_k=p.G_k, G_theta=1.0,
                    E_lambda=1.0, U_a=p.U_a / p.U_b, U_b=1.0)
    return out if out.U_a < out.U_b else p


def _vector_from_shape(p: LmoParams) -> np.ndarray:
    g = p.a1 * p.G_theta
    e = p.a3 / p.E_lambda
    w = p.a4 * (p.U_b - p.U_a)
    lo = max(p.a4 * p.U_a, 1e-6 * w)
    return np.log([p.G_k, e / g, w / g, lo / g])


def paper_grid(which: str = "coarse") -> list[LmoParams]:
    """The grid of the paper's public noise-search code: a1, a3, a4 in linspace(0.1, 0.9, 9) ("full",
    40824 points; "coarse": {0.1, 0.5, 0.9}, 1512; "minimal": 0.5 and a few of the other values, 12,
    for tests), (G_theta, G_k), E_lambda and (U_b, U_a) from the lists above."""
    if which not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {which!r}")
    gk, lams, uba = _PAPER_G_THETA_K, _PAPER_E_LAMBDA, _PAPER_U_B_A
    weights = {"full": np.linspace(0.1, 0.9, 9), "coarse": np.array([0.1, 0.5, 0.9]), "minimal": np.array([0.5])}[which]
    if which == "minimal":
        gk, lams = gk[::3], lams[2:]
    return [LmoParams(a1=float(a1), a3=float(a3), a4=float(a4), G_k=float(k), G_theta=float(th), E_lambda=float(lam),
                      U_a=float(ua), U_b=float(ub))
            for a1, a3, a4, (th, k), lam, (ub, ua) in itertools.product(weights, weights, weights, gk, lams, uba)]


def _normalise(p: LmoParams) -> LmoParams:
    """Same shape with mean(t) = 1."""
    return p.scaled(1.0 / p.mean_t())


# -- calibrating the scale of one shape ------------------------------------------------------------


class _FaithfulShape:
    """Fast, conservative-by-construction faithful epsilon of shape.scaled(c): r(v) of the base shape
    is tabulated once on a wide log grid; for scale c the unit-shift suprema over u in (0, 1] are
    suprema over v = c u in (0, c] (the grid point just above c stands in for the endpoint, an
    over-estimate since r grows with the shift). The accountant itself re-checks the final answer."""

    def __init__(self, base: LmoParams, dimension: int | None):
        self.dimension = dimension
        fisher = base.fisher_information()
        self.v = 1.0 / math.sqrt(fisher) * np.geomspace(1e-4, 1e4, 65)
        self.r = divergence_table(base, self.v, SPARSE_ORDERS)  # [orders, v]
        self.limit = SPARSE_ORDERS * fisher / 2.0

    def per_step(self, c: float) -> np.ndarray:
        j = int(np.searchsorted(self.v, c, side="right"))  # v[:j] <= c
        if j >= len(self.v):
            raise ValueError("scale beyond the tabulated range")
        upper, inner, vin = self.r[:, j], self.r[:, :j], self.v[:j]  # upper: r just above c (>= r(c))
        k2, k1, rmax = np.maximum(self.limit, upper / c**2), upper / c, upper
        if j > 0:
            k2 = np.maximum(k2, (inner / vin**2).max(axis=1))
            k1 = np.maximum(k1, (inner / vin).max(axis=1))
            rmax = np.maximum(rmax, inner.max(axis=1))
        return ball_bound(c**2 * k2, c * k1, rmax, self.dimension)

    def epsilon(self, c: float, q: float, steps: int, delta: float, k: int = 1) -> float:
        if k == 1:
            return rdp_to_epsilon(subsampled_rdp(self.per_step(c), q) * steps, delta)
        # ELS: sensitivity m C with m ~ Binomial(k, q); sensitivity m is the shape scaled by c m
        per_m = [self.per_step(c * m) for m in range(1, k + 1)]
        return rdp_to_epsilon(mixture_subsampled_rdp(per_m, binomial_pmf(k, q)) * steps, delta)

    def c_range(self, k: int = 1) -> tuple[float, float]:
        return float(self.v[0]) * 10, float(self.v[-2]) / k


def _gaussian_like_sigma(q: float, steps: int, epsilon: float, delta: float, k: int = 1) -> float:
    """sigma with eps(per-step RDP = alpha/(2 sigma^2)) = target through the generic pipeline
    (k > 1: the ELS mixture over Binomial(k, q) sensitivities); within 1e-4, never below."""
    if k == 1:
        eps_of = lambda s: generic_rdp_gaussian_epsilon(s, q=q, steps=steps, delta=delta)  # noqa: E731
    else:
        eps_of = lambda s: generic_rdp_gaussian_els_epsilon(s, k=k, q=q, steps=steps, delta=delta)  # noqa: E731
    sigma = find_boundary(lambda s: eps_of(s) <= epsilon, 1.0, larger_passes=True, rtol=1e-4, bounds=(1e-8, 1e8))
    if sigma is None:
        raise ValueError("no noise level meets the target")
    return sigma


def _objective(p: LmoParams, objective: str, gamma: float) -> float:
    """Smaller is better."""
    if objective == "usefulness":
        return -p.usefulness(gamma)
    return p.noise_variance() if objective == "variance" else p.expected_magnitude()


class _Problem:
    def __init__(self, epsilon, delta, q, steps, dimension, objective, gamma, accountant, k=1):
        self.epsilon, self.delta, self.q, self.steps, self.k = epsilon, delta, q, steps, k
        self.dimension, self.objective, self.gamma, self.accountant = dimension, objective, gamma, accountant
        self.sigma_like = _gaussian_like_sigma(q, steps, epsilon, delta, k) if accountant == "lmo_faithful" else None
        self.evaluations = 0

    def eps_faithful(self, p: LmoParams) -> float:
        if self.k > 1:
            return faithful_els_epsilon(p, k=self.k, q=self.q, steps=self.steps, delta=self.delta,
                                        dimension=self.dimension)
        return faithful_epsilon(p, q=self.q, steps=self.steps, delta=self.delta, dimension=self.dimension)

    def eps_exact(self, p: LmoParams) -> float:
        if self.accountant == "paper":
            return paper_epsilon(p, q=self.q, steps=self.steps, delta=self.delta, variant=PAPER_SEARCH_VARIANT)
        return self.eps_faithful(p)

    def proxy_scale(self, base: LmoParams) -> float:
        """Faithful: the scale at which the high-d bound (alpha I / 2 per step) meets the target."""
        return 1.0 / (self.sigma_like * math.sqrt(base.fisher_information()))

    def calibrate(self, base: LmoParams) -> tuple[LmoParams, float] | None:
        """(best feasible params of this shape, objective) or None."""
        self.evaluations += 1
        base = _normalise(base)
        if self.accountant == "paper":
            eps_of = lambda c: paper_epsilon(base.scaled(c), q=self.q, steps=self.steps, delta=self.delta,  # noqa: E731
                                             variant=PAPER_SEARCH_VARIANT)
            guess, top = 1.0, 1e3
        else:
            shape = _FaithfulShape(base, self.dimension)
            eps_of = lambda c: shape.epsilon(c, self.q, self.steps, self.delta, self.k)  # noqa: E731
            lo, top = shape.c_range(self.k)
            guess = min(max(self.proxy_scale(base), lo), top)
        c = find_boundary(lambda c: eps_of(c) <= self.epsilon, guess, larger_passes=False, rtol=2e-4,
                          bounds=(1e-12, top))
        if c is None:
            return None
        p = base.scaled(c)
        return p, _objective(p, self.objective, self.gamma)

    def screen(self, base: LmoParams) -> float:
        """Cheap ranking score of a shape (smaller is better)."""
        base = _normalise(base)
        if self.accountant == "paper":
            out = self.calibrate(base)
            return math.inf if out is None else out[1]
        return _objective(base.scaled(self.proxy_scale(base)), self.objective, self.gamma)

    def verify(self, p: LmoParams, rtol: float = 2e-3) -> tuple[LmoParams, float]:
        """Largest scale of p's shape (within rtol) that the accountant itself confirms: usually a little
        above p's (the fast path is conservative), lowered until it meets the target if p misses it."""
        c = find_boundary(lambda c: self.eps_exact(p.scaled(c)) <= self.epsilon, 1.0, larger_passes=False,
                          rtol=rtol, bounds=(1e-6, 1e6))
        if c is None:
            raise ValueError("LMO search: could not find a feasible scale during verification")
        p = p.scaled(c)
        return p, self.eps_exact(p)


# -- the search ------------------------------------------------------------------------------------


def gaussian_reference(epsilon: float, delta: float, q: float, steps: int, gamma: float = 0.9,
                       pld: bool = True, k: int = 1) -> dict:
    """Gaussian noise multipliers for the same (eps, delta, q, steps[, k]): PLD (tight; what fedsim
    uses for Gaussian runs; for k > 1 the ELS mixture-of-Gaussians PLD) and the generic RDP
    pipeline the faithful LMO accountant uses."""
    out = {}
    if pld and k == 1:
        out["sigma_pld"] = calibrate_gaussian_noise_multiplier(q, steps, epsilon, delta, "pld")
    elif pld:
        from fedsim.privacy.els_accounting import calibrate_els_noise

        out["sigma_pld"] = calibrate_els_noise(k, q, steps, epsilon, delta)
    out["sigma_generic_rdp"] = _gaussian_like_sigma(q, steps, epsilon, delta, k)
    s = out.get("sigma_pld", out["sigma_generic_rdp"])
    out.update(noise_std=s, expected_magnitude=s * math.sqrt(2 / math.pi),
               usefulness=float(special.erf(gamma / (s * math.sqrt(2)))), gamma=gamma)
    return out


def search(epsilon: float, delta: float, q: float, steps: int, dimension: int | None, objective: str = "variance",
           gamma: float = 0.9, accountant: str = "lmo_faithful", *, grid: str = "coarse", maxfev: int = 80,
           top_k: int = 4, compare_gaussian: bool = True, k: int = 1, cache=None, progress=None) -> LmoSearchResult:
    """Best LMO parameters (unit sensitivity) meeting (epsilon, delta) for `steps` Poisson(q)
    releases in `dimension` coordinates under `accountant`; see the module docstring.

    ``k > 1`` searches for ELS: q is the *example* sampling rate, each user holds k examples
    and a step is the Binomial(k, q) mixture (:class:`fedsim.privacy.lmo.LmoMixtureDpEvent`);
    only ``lmo_faithful`` can account for it (the paper has no user-level accounting).
    `cache`: None or an object with ``load(setting) -> LmoSearchResult | None`` and
    ``store(result) -> path``; `progress`: None or an object with rich's ``add_task`` and ``advance``."""
    check_positive(epsilon, "epsilon")
    check_delta(delta)
    check_sampling_rate(q)
    check_steps(steps)
    check_dimension(dimension)
    check_positive(gamma, "gamma")
    for name, value, allowed in (("objective", objective, OBJECTIVES), ("accountant", accountant, ACCOUNTANTS),
                                 ("grid", grid, GRIDS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    check_steps(k, "k (examples per user)")
    if k > 1 and accountant != "lmo_faithful":
        raise ValueError("the paper's accounting is example-level only: an ELS search (k > 1) needs"
                         " accountant='lmo_faithful'")
    if not (isinstance(maxfev, int) and maxfev >= 0) or not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError("maxfev must be an integer >= 0 and top_k an integer >= 1")
    setting = {"epsilon": float(epsilon), "delta": float(delta), "q": float(q), "steps": int(steps),
               "dimension": dimension, "objective": objective, "gamma": float(gamma), "accountant": accountant,
               "grid": grid, "maxfev": int(maxfev), "top_k": int(top_k), "compare_gaussian": bool(compare_gaussian)}
    if k != 1:  # absent for k = 1 so ULS cache keys are unchanged
        setting["k"] = int(k)
    hit = cache.load(setting) if cache is not None else None
    if hit is not None:
        hit.search["cache"] = "hit"
        return hit

    t0 = time.time()
    bar = progress if progress is not None else SimpleNamespace(add_task=lambda *a, **kw: None, advance=lambda t: None)
    prob = _Problem(epsilon, delta, q, steps, dimension, objective, gamma, accountant, k)
    shapes = paper_grid(grid)

    # 1. screen the paper's grid (shapes equal up to scale once)
    task = bar.add_task("LMO search: screening the paper's grid", total=len(shapes))
    scored, seen = [], set()
    for s in map(_normalise, shapes):
        key = tuple(np.round(_vector_from_shape(s), 9))
        if key not in seen:
            seen.add(key)
            try:
                scored.append((prob.screen(s), s))
            except ValueError:
                pass
        bar.advance(task)
    scored.sort(key=lambda x: x[0])
    # 2. calibrate the best few exactly; best = (params, objective)
    task = bar.add_task("LMO search: calibrating the best grid shapes", total=top_k)
    best = None
    for _, s in scored[:top_k]:
        out = prob.calibrate(s)
        if out is not None and (best is None or out[1] < best[1]):
            best = out
        bar.advance(task)
    if best is None:
        raise ValueError("LMO search: no grid shape meets the target")
    grid_best = best

    # 3. Nelder-Mead on the shape
    task = bar.add_task("LMO search: Nelder-Mead refinement", total=maxfev)
    seen_y: dict = {}

    def f(y):
        nonlocal best
        key = tuple(np.round(y, 6))
        if key not in seen_y:
            bar.advance(task)
            try:
                out = prob.calibrate(_shape_from_vector(y))
            except (ValueError, FloatingPointError):
                out = None
            ok = out is not None and math.isfinite(out[1])
            if ok and out[1] < best[1]:
                best = out
            val = out[1] if ok else 1e12
            seen_y[key] = math.log(val) if objective != "usefulness" else val
        return seen_y[key]

    if maxfev > 0:
        y0 = _vector_from_shape(best[0])
        simplex = np.array([y0] + [y0 + np.eye(4)[i] * 0.7 for i in range(4)])
        optimize.minimize(f, y0, method="Nelder-Mead",
                          options={"maxfev": maxfev, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-5})

    # 4. verify with the accountant itself
    task = bar.add_task("LMO search: verifying with the accountant", total=1)
    params, eps_chosen = prob.verify(canonical(best[0]))
    bar.advance(task)
    if not eps_chosen <= epsilon:  # never return infeasible
        raise ValueError(f"LMO search: verification failed (eps={eps_chosen:.6g} > {epsilon:g})")
    result = LmoSearchResult(
        params=params, setting=setting, noise_std=params.noise_std(), expected_magnitude=params.expected_magnitude(),
        usefulness=params.usefulness(gamma), epsilon_faithful=prob.eps_faithful(params),
        # the paper does not account for a user's k examples
        epsilon_paper={v: paper_epsilon(params, q=q, steps=steps, delta=delta, variant=v) for v in PAPER_VARIANTS}
        if k == 1 else {},
        gaussian=gaussian_reference(epsilon, delta, q, steps, gamma, pld=compare_gaussian, k=k),
        objective_value=_objective(params, objective, gamma),
        search={"seconds": round(time.time() - t0, 2), "grid_shapes": len(scored), "calibrations": prob.evaluations,
                "grid_best_objective": grid_best[1], "grid_best_params": grid_best[0].to_dict(), "cache": "miss",
                "paper_search_variant": PAPER_SEARCH_VARIANT})
    if cache is not None:
        try:
            result.search["cache_file"] = str(cache.store(result))
        except OSError as exc:  # a read-only cache is not fatal
            result.search["cache_error"] = str(exc)
    return result
