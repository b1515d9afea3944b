"""The LMO-DP paper's accounting (arXiv 2405.18776), reproduced for comparison only: **not an
upper bound** on what fedsim releases (it can err either way; `paper_epsilon` lists its flaws).

What the paper's closed form computes: for fixed t the Renyi divergence of Laplace(0, 1/t) from
Laplace(u, 1/t) is ``rho_t(u) = log[(a e^{(a-1)tu} + (a-1) e^{-a t u}) / (2a-1)] / (a-1)`` (Mironov
2017, Prop. 6). The paper's formula equals ``log E_t[exp((a-1) rho_t(1))] / (a-1)``, the Renyi
divergence of the *pair* (t, Y), as if t were published. Dropping t is post-processing, so by the
data-processing inequality (equivalently, joint convexity of ``exp((a-1) D_a)``) the divergence of
the mixture density -- what is actually released -- is **at most** the paper's value, and strictly
smaller for a non-degenerate t. (Nor is it the average E_t[rho_t]: that is below the paper's value
by Jensen, but it is the divergence of nothing released and bounds nothing.) So the 1-D, shift-1
formula over-states the per-coordinate loss; the accounting goes wrong elsewhere (dimension and
subsampling, see :func:`paper_epsilon`).
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.privacy.accounting import check_delta, check_sampling_rate, check_steps
from fedsim.privacy.lmo.params import LmoParams
from fedsim.privacy.subsampled_rdp import rdp_to_epsilon

#: Orders of the paper's code (`DEFAULT_ALPHAS = range(2, 129)`).
PAPER_ORDERS = np.arange(2, 129, dtype=np.int64)
PAPER_VARIANTS = ("per_step", "composed")


def lmo_valid_order_limit(params: LmoParams, sensitivity: float = 1.0) -> float:
    """Sup of the orders alpha at which the paper's formula is finite (the MGF of t at s(alpha-1),
    s the sensitivity, exists); inf when neither Gamma nor Exp is used."""
    gamma_lim = 1 + 1.0 / (params.a1 * params.G_theta * sensitivity) if params.a1 > 0 else math.inf
    return min(gamma_lim, 1 + params.E_lambda / (params.a3 * sensitivity) if params.a3 > 0 else math.inf)


def lmo_rdp(alpha: float, params: LmoParams, sensitivity: float = 1.0) -> float:
    """The paper's RDP formula at order alpha for a 1-D shift of `sensitivity`::

        eps(alpha) = log[(alpha M(s(alpha-1)) + (alpha-1) M(-s alpha)) / (2 alpha - 1)] / (alpha - 1)

    with M the MGF of t: the divergence of (t, output) (module docstring). Orders where M diverges
    are refused (the paper's code evaluates them anyway: with an integer G_k, to a meaningless number).
    """
    alpha = float(alpha)
    if not alpha > 1 or not math.isfinite(alpha):
        raise ValueError(f"the Renyi order must be a finite number > 1, got {alpha!r}")
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity!r}")
    lim = lmo_valid_order_limit(params, sensitivity)
    if not alpha < lim:
        raise ValueError(
            f"order alpha={alpha:g} is outside the validity region of the LMO RDP formula "
            f"(needs a1*G_theta*s*(alpha-1) < 1 and a3*s*(alpha-1) < E_lambda, i.e. alpha < {lim:.6g}): "
            "the MGF of t diverges there"
        )
    lm_pos = params.log_mgf(sensitivity * (alpha - 1))
    lm_neg = params.log_mgf(-sensitivity * alpha)
    num = np.logaddexp(math.log(alpha) + lm_pos, math.log(alpha - 1) + lm_neg)
    return float((num - math.log(2 * alpha - 1)) / (alpha - 1))


def paper_rdp_curve(params: LmoParams, orders=PAPER_ORDERS) -> np.ndarray:
    """:func:`lmo_rdp` (sensitivity 1) at `orders`, vectorised; inf outside the validity region and
    where the value is not positive, as their `compute_privacy_lmo` does."""
    a = np.asarray(orders, dtype=float)
    lm_pos = params.log_mgf_array(a - 1)
    lm_neg = params.log_mgf_array(-a)
    with np.errstate(invalid="ignore"):
        num = np.logaddexp(np.log(a) + lm_pos, np.log(a - 1) + lm_neg)
        rdp = (num - np.log(2 * a - 1)) / (a - 1)
    valid = np.isfinite(rdp) & (rdp > 0) & (a < lmo_valid_order_limit(params))
    return np.where(valid, rdp, np.inf)


def _amplified(eps: float, q: float) -> float:
    """The paper's post-hoc "amplification by subsampling" of an epsilon: log(1 + q (e^eps - 1))."""
    if not math.isfinite(eps):
        return math.inf
    return float(np.log1p(q * np.expm1(eps))) if eps < 700 else eps + math.log(q)


def paper_epsilon(params: LmoParams, *, q: float, steps: int, delta: float, variant: str = "per_step") -> float:
    """Epsilon as the LMO-DP paper's public code computes it. **Not an upper bound.**

    Both variants start from :func:`lmo_rdp` at alpha = 2..128 (orders outside the validity region
    dropped; their code does not drop them) and convert with CKS (arXiv 2004.00010, Prop. 12; their
    `get_privacy_spent` is dp_accounting's `compute_epsilon`). Then, as in their code:

    * ``variant="per_step"`` (their public offline noise search, which produced their parameters):
      one step's epsilon at `delta`, "amplified" as ``log(1 + q (e^eps - 1))``, times `steps`
      (their search keeps it below target/T). The total delta is really steps*delta (unreported);
    * ``variant="composed"`` (the paper's public privacy-checking code, `compute_privacy_lmo(lmo, steps)`
      then `get_log_epsilon`): RDP times `steps`, converted, then amplified the same way.

    Flaws (why fedsim never budgets with this):

    * **dimension ignored** -- one coordinate shifted by the sensitivity; an L2-clipped
      update moves all d coordinates at once, and for large d the worst case (mass spread
      over many coordinates) costs ``alpha * I / 2`` per unit of squared norm (I the Fisher
      information of the noise), unbounded in alpha, while the 1-D value stays below the
      pure-DP slope. At high orders the paper under-counts by orders of magnitude;
    * **subsampling applied to an (eps, delta) after conversion** -- ``log(1+q(e^eps-1))``
      amplifies one sampled release; applied to T composed steps it is not a theorem, and
      per step followed by linear composition it throws away the sqrt(T) of advanced
      composition while multiplying delta by T. Depending on the regime the number is
      optimistic or wildly pessimistic;
    * the formula is the divergence of (t, output), so it over-counts the per-coordinate
      loss -- the one conservative ingredient;
    * the released code evaluates orders outside the MGF's domain, samples the Exponential
      with numpy's *scale* = E_lambda although the formula uses a rate, has a generator with
      Laplace scale t instead of 1/t, and reports a run's epsilon through an "equivalent
      Gaussian sigma" (sqrt(2 log(1.25/delta))/eps plugged into a subsampled-Gaussian RDP
      accountant), i.e. the epsilon of a different mechanism.
    """
    check_sampling_rate(q)
    check_steps(steps)
    check_delta(delta)
    if variant not in PAPER_VARIANTS:
        raise ValueError(f"variant must be one of {PAPER_VARIANTS}, got {variant!r}")
    rdp = paper_rdp_curve(params)
    if not np.isfinite(rdp).any():
        return math.inf
    if variant == "composed":
        return _amplified(rdp_to_epsilon(rdp * steps, delta, PAPER_ORDERS), q)
    return steps * _amplified(rdp_to_epsilon(rdp, delta, PAPER_ORDERS), q)
