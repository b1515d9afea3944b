"""Poisson-subsampled Renyi DP of *any* mechanism from its RDP curve at integer orders (dp_accounting
knows only the subsampled Gaussian), for RDP known only numerically (LMO noise); fed a Gaussian
curve, a like-for-like reference. And the Canonne-Kamath-Steinke conversion to (epsilon, delta).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special

from fedsim.privacy.accounting import check_positive
from fedsim.privacy.mechanisms import binomial_pmf

#: Integer Renyi orders of the bounds below (the binomial expansion needs integers).
ORDERS = np.arange(2, 257, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _binomial_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = ORDERS.astype(float)[:, None]  # rows: order a
    ell = ORDERS.astype(float)[None, :]  # columns: l = 2..a_max
    with np.errstate(invalid="ignore"):
        logc = special.gammaln(a + 1) - special.gammaln(ell + 1) - special.gammaln(np.maximum(a - ell, 0) + 1)
    logc = np.where(ell <= a, logc, -np.inf)
    return logc, np.maximum(a - ell, 0), np.broadcast_to(ell, logc.shape).copy()


def subsampled_rdp(eps: np.ndarray, q: float, eps_reverse: np.ndarray | None = None) -> np.ndarray:
    """RDP at ORDERS of a Poisson(q)-subsampled mechanism whose RDP curve is `eps` (at ORDERS),
    for add/remove neighbours. Max of the two directions, each bounded below.

    With P the output law without the user, Q with it, L = dQ/dP, M = (1-q)P + qQ:

    * ``D_a(M||P)`` -- for integer a, ``E_P[(1-q+qL)^a]`` expands binomially and
      ``E_P[L^l] = exp((l-1) D_l(Q||P))`` (E_P[L] = 1), so exactly
      ``(1-q)^{a-1}(1+(a-1)q) + sum_{l=2}^a C(a,l)(1-q)^{a-l} q^l e^{(l-1) D_l}`` -- the
      expression of Zhu & Wang (ICML 2019) Thm 5/6 without their factor 3, which covers the
      other direction; here that direction is bounded separately:
    * ``D_a(P||M)`` -- ``E_P[Y^{-(a-1)}]`` with ``Y = 1-q+qL >= 1-q``. For h(y) = y^{-b}
      (b = a-1), h(y) = 1 - b(y-1) + (y-1)^2 D(y) with D(y) = int_0^1 (1-s) h''(1+s(y-1)) ds,
      decreasing in y since h'' is; so on y >= 1-q, D(y) <= D(1-q) = ((1-q)^{-b} - 1 - bq)/q^2.
      E_P[Y-1] = 0 and E_P[(Y-1)^2] = q^2 (e^{D_2(Q||P)} - 1) give
      ``E_P[Y^{-b}] <= 1 + ((1-q)^{-b} - 1 - bq)(e^{D_2} - 1)``.
    * both directions are also at most ``log(1 - q + q e^{(a-1) D_a})/(a-1)`` (joint
      convexity of exp((a-1) D_a)), which is <= the unsampled D_a; the minimum is kept.
      That uses ``D_a(Q||P)`` for ``D_a(M||P)`` and ``D_a(P||Q)`` for ``D_a(P||M)``: pass
      `eps_reverse` (a bound on ``D_a(P||Q)``) when it differs from `eps` (a bound on
      ``D_a(Q||P)``); the default takes them equal (symmetric noise, a single shift).
    """
    eps = np.asarray(eps, dtype=float)
    if q >= 1.0:
        return eps.copy()
    logc, a_minus_l, ell = _binomial_tables()
    lq, l1q = math.log(q), math.log1p(-q)
    cgf = np.minimum((ORDERS - 1) * eps, 1e300)  # (l-1) eps(l); inf kept finite to avoid inf - inf
    terms = logc + a_minus_l * l1q + ell * lq + cgf[None, :]  # -inf where l > a
    head = (ORDERS - 1) * l1q + np.log1p((ORDERS - 1) * q)
    m = np.maximum(terms.max(axis=1), head)
    with np.errstate(invalid="ignore"):
        first = m + np.log(np.exp(head - m) + np.exp(terms - m[:, None]).sum(axis=1))
    first = np.where(np.isfinite(m), first, m)
    b = (ORDERS - 1).astype(float)
    coef = np.expm1(-b * l1q) - b * q
    eps2 = float(eps[0])
    with np.errstate(over="ignore"):
        second = np.log1p(coef * math.expm1(min(eps2, 700.0))) if math.isfinite(eps2) else np.full(len(ORDERS), np.inf)
    convex = np.logaddexp(l1q, lq + cgf)
    cgf_rev = cgf if eps_reverse is None else np.minimum((ORDERS - 1) * np.asarray(eps_reverse, dtype=float), 1e300)
    convex_rev = np.logaddexp(l1q, lq + cgf_rev)
    out = np.maximum(np.minimum(first, convex), np.minimum(second, convex_rev)) / (ORDERS - 1)
    out = np.where(out > 1e200, np.inf, out)
    return np.maximum(out, 0.0)


def mixture_subsampled_rdp(eps_by_sensitivity, probs) -> np.ndarray:
    """RDP at ORDERS of a release in which a user is absent with probability ``probs[0]`` and
    shifts it by (at most) sensitivity m with probability ``probs[m]``, m = 1..k, given
    ``eps_by_sensitivity[m - 1]``: the RDP curve (at ORDERS) of one unsampled release at
    sensitivity m. This is the ELS step (m ~ Binomial(k, q) of the user's k examples sampled).

    With P the output law without the user and ``Q = sum_{m>=1} v_m Q_m`` (v_m = probs[m] / p,
    p = 1 - probs[0]) the law given that the user is present, the release is
    ``(1 - p) P + p Q``: Poisson subsampling at rate p of a mechanism whose output law is Q,
    bounded by :func:`subsampled_rdp` from bounds on ``D_l(Q||P)`` and ``D_l(P||Q)``:

    * ``D_l(Q||P)``: ``exp((l-1) D_l(Q||P)) = E_P[L^l] = ||L||_l^l`` with ``L = sum v_m L_m``
      (L_m = dQ_m/dP), so by Minkowski's inequality in L^l(P)
      ``(l-1) D_l(Q||P) <= l log sum_m v_m exp((l-1) eps_m(l) / l)``;
    * ``D_l(P||Q)``: ``exp((l-1) D_l(P||Q)) = int P^l Q^{1-l}`` is convex in Q (l > 1), so
      ``(l-1) D_l(P||Q) <= log sum_m v_m exp((l-1) eps_m(l))`` (eps_m bounds both directions
      for a single shift: the noise is symmetric).

    Each Q_m is itself a mixture over which of the user's examples were sampled; the same
    two inequalities apply to it, and every one of those releases shifts the clipped sum by
    L2 norm <= m C, which eps_m covers. With k = 1 this is exactly :func:`subsampled_rdp` at
    rate q.
    """
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 1 or len(probs) < 1 or np.any(probs < 0) or not math.isclose(probs.sum(), 1.0, rel_tol=1e-9):
        raise ValueError(f"probs must be a probability vector over sensitivities 0..k, got {probs.tolist()!r}")
    eps = np.asarray(eps_by_sensitivity, dtype=float).reshape(len(probs) - 1, len(ORDERS))
    p = float(probs[1:].sum())
    if p == 0:
        return np.zeros(len(ORDERS))
    keep = probs[1:] > 0
    logw = np.log(probs[1:][keep] / p)
    cgf = np.minimum((ORDERS - 1) * eps[keep], 1e300)  # (l-1) eps_m(l)
    forward = ORDERS * special.logsumexp(cgf / ORDERS + logw[:, None], axis=0) / (ORDERS - 1)  # Minkowski
    reverse = special.logsumexp(cgf + logw[:, None], axis=0) / (ORDERS - 1)  # convexity
    return subsampled_rdp(forward, min(p, 1.0), eps_reverse=reverse)


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """Epsilon at `delta` from an RDP curve at `orders`: Canonne, Kamath, Steinke 2020
    (arXiv 2004.00010, Prop. 12), vectorised; the same formula, value for value, as
    dp_accounting's `rdp_privacy_accountant.compute_epsilon` (an order whose RDP is so small
    that delta^2 > 1 - e^{-rdp} gives 0, by the KL bound)."""
    a = np.asarray(orders, dtype=float)
    r = np.asarray(rdp, dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        eps = r + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1)
        eps = np.where(delta**2 + np.expm1(-r) > 0, 0.0, eps)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return float(max(0.0, eps.min()))


def generic_rdp_gaussian_epsilon(sigma: float, *, q: float, steps: int, delta: float) -> float:
    """A Gaussian (noise multiplier sigma) pushed through the *same* generic pipeline as LMO
    (:func:`subsampled_rdp` + CKS), for like-for-like comparisons of the noise shape."""
    check_positive(sigma, "sigma")
    return rdp_to_epsilon(subsampled_rdp(ORDERS / (2.0 * sigma**2), q) * steps, delta)


def generic_rdp_gaussian_els_epsilon(sigma: float, *, k: int, q: float, steps: int, delta: float) -> float:
    """A Gaussian ELS run pushed through the same generic mixture pipeline as LMO
    (:func:`mixture_subsampled_rdp` + CKS); with k = 1 it is :func:`generic_rdp_gaussian_epsilon`."""
    check_positive(sigma, "sigma")
    per_m = [ORDERS * m * m / (2.0 * sigma**2) for m in range(1, k + 1)]
    return rdp_to_epsilon(mixture_subsampled_rdp(per_m, binomial_pmf(k, q)) * steps, delta)
