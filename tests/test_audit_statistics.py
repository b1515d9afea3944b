"""fedsim.auditing.statistics: the one-run lower bound (Steinke, Nasr, Jagielski 2023), the one-shot
estimate (Andrew et al. 2024), exposure (Carlini et al. 2019). Checked against independent
computations (closed forms, exact binomial sums, dp_accounting, numerical integration) and by
simulating mechanisms whose epsilon is known."""

import itertools
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.stats
from dp_accounting import dp_event
from dp_accounting.gaussian_mechanism import get_epsilon_gaussian
from dp_accounting.pld import pld_privacy_accountant

from fedsim.auditing.statistics import (
    GuessOutcome,
    OneRunAudit,
    OneShotEstimate,
    epsilon_lower_bound,
    exposure,
    extrapolated_exposure,
    gaussian_pair_delta,
    gaussian_pair_epsilon,
    one_run_audit,
    one_run_p_value,
    one_shot_epsilon,
)

# ----------------------------------------------------------------------------- one-run bound


def _q(eps):
    return math.exp(eps) / (1.0 + math.exp(eps))


def _reference_p_value(m, r, v, eps, delta):
    """(S1) written out with exact integer binomial coefficients (no scipy):
    f(t) = sum_{k >= t} C(r, k) q^k (1-q)^(r-k); p = f(v) + 2 m delta max_{1<=i<=m} (f(v-i)-f(v))/i."""
    q = _q(eps)
    pmf = [math.comb(r, k) * q**k * (1.0 - q) ** (r - k) for k in range(r + 1)]

    def f(t):
        return 1.0 if t <= 0 else sum(pmf[t:])

    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, f(v) + 2.0 * m * delta * alpha)


def _reference_bound(m, r, v, delta, beta):
    def g(e):
        return _reference_p_value(m, r, v, e, delta) - beta

    if g(0.0) >= 0:
        return 0.0
    return scipy.optimize.brentq(g, 0.0, 50.0, xtol=1e-12)


def test_all_correct_pure_dp_has_a_closed_form():
    # delta = 0, v = r: p(eps) = q^r, so the bound solves q = beta^(1/r), eps = log(q / (1 - q)).
    for r, beta in ((10, 0.05), (100, 0.05), (1000, 0.01)):
        q = beta ** (1.0 / r)
        expected = math.log(q / (1.0 - q))
        got = epsilon_lower_bound(m=5 * r, r=r, v=r, delta=0.0, confidence=1 - beta)
        assert got == pytest.approx(expected, abs=1e-8)
    # r = m = 100 all correct at 95%: 3.4930 (the largest a 100-canary audit can show); the
    # 2 m delta term of (S1) lowers it a little
    assert epsilon_lower_bound(100, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-4)
    assert 3.48 < epsilon_lower_bound(100, 100, 100, 1e-5) < 3.4930


@pytest.mark.parametrize("m,r,v,delta,beta", [
    (60, 60, 50, 1e-3, 0.05),
    (100, 40, 36, 1e-4, 0.05),
    (200, 100, 90, 1e-5, 0.01),
    (50, 50, 50, 1e-2, 0.05),
    (80, 30, 26, 0.0, 0.1),
])
def test_matches_an_exact_binomial_computation(m, r, v, delta, beta):
    ours = epsilon_lower_bound(m, r, v, delta, confidence=1 - beta)
    assert ours > 0
    assert ours == pytest.approx(_reference_bound(m, r, v, delta, beta), rel=1e-7, abs=1e-8)
    for eps in (0.0, 0.7, 2.0, ours):
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
            _reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)
    # rigorous side: the returned eps is itself rejected
    assert one_run_p_value(m, r, v, ours, delta) < beta


@pytest.mark.parametrize("r,v,beta", [(1000, 700, 0.05), (200, 170, 0.01), (5000, 2700, 0.05)])
def test_delta_zero_is_the_pure_dp_binomial_statement(r, v, beta):
    # the largest eps with P[Binomial(r, e^eps/(1+e^eps)) >= v] < beta (scipy's binomial tail)
    expected = scipy.optimize.brentq(lambda e: scipy.stats.binom.sf(v - 1, r, _q(e)) - beta,
                                     0.0, 30.0, xtol=1e-12)
    assert epsilon_lower_bound(10 * r, r, v, 0.0, 1 - beta) == pytest.approx(expected, abs=1e-8)


def test_bound_is_monotone_in_v_and_delta_and_zero_near_chance():
    m, r = 1000, 400
    bounds = [epsilon_lower_bound(m, r, v, 1e-5) for v in range(200, 401, 5)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    positive = [b for b in bounds if b > 0]
    assert all(b2 > b1 for b1, b2 in itertools.pairwise(positive))
    assert bounds[0] == 0.0 and bounds[-1] > 3.0
    # about half right: nothing can be concluded
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 1000, 520, 1e-5) == 0.0  # P[Bin(1000, 1/2) >= 520] ~ 0.11
    assert epsilon_lower_bound(1000, 100, 0, 1e-5) == 0.0
    # a larger delta or a higher confidence can only lower the bound
    by_delta = [epsilon_lower_bound(1000, 300, 290, d) for d in (0.0, 1e-6, 1e-4, 1e-3, 1e-2)]
    assert all(b2 <= b1 for b1, b2 in itertools.pairwise(by_delta)) and by_delta[-1] < by_delta[0]
    assert epsilon_lower_bound(1000, 300, 290, 1e-5, 0.99) < epsilon_lower_bound(1000, 300, 290, 1e-5, 0.9)


def _randomized_response_audit(rng, m, eps0):
    """Each canary's score is its secret bit flipped w.p. 1/(1+e^eps0) (eps0-DP per canary),
    plus independent tie-breaking noise (post-processing, still eps0-DP)."""
    included = rng.random(m) < 0.5
    flip = rng.random(m) < 1.0 / (1.0 + math.exp(eps0))
    scores = (included ^ flip).astype(float) + 0.1 * rng.random(m)
    return scores, included


def test_soundness_on_an_exactly_eps0_dp_mechanism():
    eps0, reps, m = 1.0, 200, 1000
    rng = np.random.default_rng(20230515)
    over_pure, over_audit = 0, 0
    for _ in range(reps):
        scores, included = _randomized_response_audit(rng, m, eps0)
        # one fixed setting, delta = 0: the pure-DP test at level 5% (tight for RR)
        single = one_run_audit(scores, included, 0.0, 0.95, guess_counts=[(m // 2, m // 2)])
        over_pure += single.epsilon_lower_bound > eps0
        # the default search over guess counts, Bonferroni-corrected, at delta = 1e-5
        over_audit += one_run_audit(scores, included, 1e-5).epsilon_lower_bound > eps0
    assert over_pure <= 0.05 * reps + 8  # Binomial(200, <= 0.05): mean <= 10, sd ~ 3
    assert over_audit <= 0.05 * reps + 8


def test_close_to_eps0_for_many_canaries():
    eps0 = 2.0
    scores, included = _randomized_response_audit(np.random.default_rng(7), 10_000, eps0)
    audit = one_run_audit(scores, included, 1e-5)
    assert 0.5 * eps0 <= audit.epsilon_lower_bound <= eps0
    assert audit.epsilon_lower_bound > 0.85 * eps0  # guessing everyone: ~1.9


def test_one_run_audit_counts_and_bonferroni():
    #             canary:   0     1      2     3      4     5
    scores = np.array([0.9, -1.0, 0.5, 2.0, -0.3, 0.1])
    included = np.array([True, False, False, True, True, False])
    # ascending order: 1, 4, 5, 2, 0, 3 -> top-2 {0, 3} both in; bottom-2 {1, 4}: 1 out, 4 in
    audit = one_run_audit(scores, included, 0.0, 0.9, guess_counts=[2, (1, 0), (0, 3)])
    assert isinstance(audit, OneRunAudit) and audit.m == 6
    assert [(t.k_plus, t.k_minus, t.guesses, t.correct) for t in audit.tried] == \
        [(2, 2, 4, 3), (1, 0, 1, 1), (0, 3, 3, 2)]
    for t in audit.tried:  # each setting tested at 1 - 0.1 / 3
        assert isinstance(t, GuessOutcome)
        assert t.epsilon_lower_bound == epsilon_lower_bound(6, t.guesses, t.correct, 0.0, 1 - 0.1 / 3)
    best = max(audit.tried, key=lambda t: t.epsilon_lower_bound)
    assert (audit.epsilon_lower_bound, audit.k_plus, audit.k_minus, audit.guesses, audit.correct) == \
        (best.epsilon_lower_bound, best.k_plus, best.k_minus, best.guesses, best.correct)
    assert audit.confidence == 0.9 and audit.delta == 0.0


def test_one_run_audit_default_grid_and_perfect_guesses():
    included = np.random.default_rng(3).permutation(np.arange(2000) < 1000)  # exactly half in
    audit = one_run_audit(included.astype(float), included, 1e-5)  # a perfect attack
    ks = [(t.k_plus, t.k_minus) for t in audit.tried]
    assert len(ks) == len(set(ks)) >= 5 and all(kp == km for kp, km in ks)
    assert all(t.correct == t.guesses for t in audit.tried)
    # all 2000 guessed right: the best bound uses every canary, at 1 - 0.05 / len(tried)
    assert (audit.k_plus, audit.k_minus) == (1000, 1000)
    assert audit.epsilon_lower_bound == epsilon_lower_bound(2000, 2000, 2000, 1e-5,
                                                            1 - 0.05 / len(audit.tried))
    # 0/1 integers are accepted for included; one canary works
    assert one_run_audit([0.2, 0.1], [1, 0], 0.0).m == 2
    assert one_run_audit([0.2], [True], 0.0).tried[0].guesses == 1


# ------------------------------------------------------------------------- two Gaussians


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-2, 1e-5, 1e-9])
def test_equal_variances_is_the_analytic_gaussian_mechanism(sigma, delta):
    expected = get_epsilon_gaussian(sigma, delta)  # dp_accounting, Balle & Wang 2018
    assert gaussian_pair_epsilon(0.0, sigma, 1.0, sigma, delta) == pytest.approx(expected, rel=1e-6)
    # invariant under shifts, scales and the order of the pair
    assert gaussian_pair_epsilon(3.0, 0.01 * sigma, 2.99, 0.01 * sigma, delta) == \
        pytest.approx(expected, rel=1e-6)
    assert gaussian_pair_epsilon(1.0, sigma, 0.0, sigma, delta) == pytest.approx(expected, rel=1e-6)
    # numerically unequal spreads take the quadratic branch of (G2): still the same epsilon
    for tiny in (-1e-12, 1e-12):
        assert gaussian_pair_epsilon(0.0, sigma, 1.0, sigma * (1 + tiny), delta) == \
            pytest.approx(expected, rel=1e-6)


def test_equal_variances_match_balle_wang_formula_and_pld():
    sigma, delta = 0.8, 1e-5
    eps = gaussian_pair_epsilon(0.0, sigma, 1.0, sigma, delta)
    mu = 1.0 / sigma  # (G3): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    phi = scipy.stats.norm.cdf
    assert phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) == pytest.approx(delta, rel=1e-7)
    pld = pld_privacy_accountant.PLDAccountant().compose(dp_event.GaussianDpEvent(sigma))
    assert pld.get_epsilon(delta) == pytest.approx(eps, rel=1e-3)  # pessimistic discretisation


def _hockey_stick_by_quadrature(eps, mu_p, s_p, mu_q, s_q):
    p = scipy.stats.norm(mu_p, s_p).pdf
    q = scipy.stats.norm(mu_q, s_q).pdf
    lo = min(mu_p - 15 * s_p, mu_q - 15 * s_q)  # outside: mass < 1e-50
    hi = max(mu_p + 15 * s_p, mu_q + 15 * s_q)
    pieces = np.linspace(lo, hi, 61)
    return sum(scipy.integrate.quad(lambda y: max(0.0, p(y) - math.exp(eps) * q(y)), a, b,
                                    epsabs=1e-16, epsrel=1e-12, limit=200)[0]
               for a, b in itertools.pairwise(pieces))


@pytest.mark.parametrize("mu0,sigma0,mu1,sigma1,delta", [
    (0.0, 1.0, 1.0, 1.05, 1e-5),
    (0.0, 1.0, 2.0, 0.7, 1e-3),
    (0.0, 0.01, 0.012, 0.011, 1e-5),
    (1.0, 2.0, 1.0, 1.0, 1e-2),   # equal means, different spreads
])
def test_unequal_variances_by_numerical_integration(mu0, sigma0, mu1, sigma1, delta):
    eps = gaussian_pair_epsilon(mu0, sigma0, mu1, sigma1, delta)
    assert eps > 0
    both = max(_hockey_stick_by_quadrature(eps, mu0, sigma0, mu1, sigma1),
               _hockey_stick_by_quadrature(eps, mu1, sigma1, mu0, sigma0))
    assert both == pytest.approx(delta, rel=1e-5)
    assert gaussian_pair_delta(mu0, sigma0, mu1, sigma1, eps) == pytest.approx(delta, rel=1e-9)
    assert gaussian_pair_epsilon(mu1, sigma1, mu0, sigma0, delta) == pytest.approx(eps, rel=1e-9)
    assert gaussian_pair_epsilon(mu0, sigma0, mu0, sigma0, delta) == 0.0  # identical laws


# --------------------------------------------------------------------------- one-shot estimate


def test_one_shot_recovers_the_gaussian_mechanism_epsilon():
    """Each canary c (a random unit vector in d dimensions) released once as c + N(0, s^2 I_d);
    its final-model statistic is cos(c, c + z). By rotation invariance this is exactly
    (1 + s g) / sqrt((1 + s g)^2 + s^2 chi2_{d-1}), g ~ N(0, 1), so 20,000 canaries cost no
    d-vectors; a never-inserted direction's cosine is exactly g / sqrt(g^2 + chi2_{d-1}).
    (With 1,000 canaries the fitted sigma's ~2% error moves eps at delta = 1e-5 by up to
    ~+30%; 20,000 bring that to a few percent: 40 seeds gave 0.98..1.08.)"""
    d, n, s, delta = 10_000, 20_000, 0.8, 1e-5
    rng = np.random.default_rng(2302_03098)
    num = 1.0 + s * rng.standard_normal(n)
    cosines = num / np.sqrt(num**2 + s**2 * rng.chisquare(d - 1, n))
    g = rng.standard_normal(n)
    null = g / np.sqrt(g**2 + rng.chisquare(d - 1, n))
    analytic = get_epsilon_gaussian(s, delta)  # ~5.68
    closed_null = one_shot_epsilon(cosines, None, delta, dimension=d)
    empirical_null = one_shot_epsilon(cosines, null, delta)
    assert closed_null.epsilon == pytest.approx(analytic, rel=0.10)
    assert empirical_null.epsilon == pytest.approx(analytic, rel=0.10)
    assert isinstance(closed_null, OneShotEstimate)
    assert (closed_null.count, closed_null.null_count, empirical_null.null_count) == (n, 0, n)
    assert (closed_null.mu0, closed_null.sigma0) == (0.0, 1 / math.sqrt(d))
    assert empirical_null.sigma0 == pytest.approx(1 / math.sqrt(d), rel=0.03)
    assert closed_null.mu1 * math.sqrt(d) == pytest.approx(1 / s, rel=0.02)


def test_one_shot_on_one_release_of_a_sum_of_canaries():
    """The literal mechanism: 1,000 random unit directions summed into one release
    x = sum_j c_j + N(0, s^2 I) in d = 10,000; statistic cos(c_j, x); null: 1,000 directions
    never inserted. The other canaries act as extra noise (variance 999/d per direction) and
    1,000 samples leave the fitted spreads ~2% uncertain, so over 20 seeds the estimate was
    0.89..1.21 times the analytic epsilon: asserted within 25%, not 10% (the next-but-one
    test's 20,000 canaries give 10%)."""
    d, n, s, delta = 10_000, 1000, 0.8, 1e-5
    rng = np.random.default_rng(11)
    c = rng.standard_normal((n, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c.sum(axis=0) + s * rng.standard_normal(d)
    cosines = c @ x / np.linalg.norm(x)
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    null = u @ x / np.linalg.norm(x)
    analytic = get_epsilon_gaussian(s, delta)
    assert one_shot_epsilon(cosines, None, delta, dimension=d).epsilon == pytest.approx(analytic, rel=0.25)
    assert one_shot_epsilon(cosines, null, delta).epsilon == pytest.approx(analytic, rel=0.25)
    # no signal: canaries never inserted look like the null, epsilon near 0
    assert one_shot_epsilon(null, None, 1e-2, dimension=d).epsilon < 0.5


# ------------------------------------------------------------------------------------ exposure


def test_exposure_by_rank():
    refs = np.arange(1, 1024, dtype=float)  # 1023 references: |R| = 1024
    assert exposure(0.5, refs) == pytest.approx(10.0)          # lowest loss: rank 1
    assert exposure(1023.5, refs) == pytest.approx(0.0)        # highest: rank 1024
    assert exposure(511.5, refs) == pytest.approx(1.0)         # rank 512
    assert exposure(1.0, refs) == pytest.approx(10 - 1.0)      # tie with the lowest: rank 2
    assert exposure(3.0, [3.0, 3.0, 3.0]) == pytest.approx(0.0)


def test_extrapolated_exposure_matches_the_tail():
    rng = np.random.default_rng(5)
    refs = rng.standard_normal(20_000)
    expected = -scipy.stats.norm.logcdf(-3.0) / math.log(2)   # ~9.38 bits
    assert extrapolated_exposure(-3.0, refs, "normal") == pytest.approx(expected, rel=0.03)
    assert extrapolated_exposure(-3.0, refs) == pytest.approx(expected, rel=0.08)  # skew-normal
    assert exposure(-3.0, refs) == pytest.approx(expected, abs=0.6)
    # beyond every reference the rank saturates at log2 |R|; the fit does not
    assert exposure(-8.0, refs) == pytest.approx(math.log2(20_001))
    assert extrapolated_exposure(-8.0, refs, "normal") > 40


# ---------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_clear_value_errors():
    with pytest.raises(ValueError, match="same length"):
        one_run_audit([0.1, 0.2, 0.3], [True, False], 1e-5)
    with pytest.raises(ValueError, match="NaN"):
        one_run_audit([0.1, float("nan")], [True, False], 1e-5)
    with pytest.raises(ValueError, match="m \\(number of canaries\\)"):
        one_run_audit([], [], 1e-5)
    with pytest.raises(ValueError, match="m \\(number of canaries\\)"):
        epsilon_lower_bound(0, 0, 0, 1e-5)
    for confidence in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="confidence"):
            epsilon_lower_bound(10, 10, 10, 1e-5, confidence)
        with pytest.raises(ValueError, match="confidence"):
            one_run_audit([0.1, 0.2], [True, False], 1e-5, confidence)
    with pytest.raises(ValueError, match="v <= r <= m"):
        epsilon_lower_bound(10, 5, 6, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(10, 5, 5, -1e-5)
    with pytest.raises(ValueError, match="bool"):
        one_run_audit([0.1, 0.2], [2, 0], 1e-5)
    with pytest.raises(ValueError, match="k_plus \\+ k_minus"):
        one_run_audit([0.1, 0.2], [True, False], 1e-5, guess_counts=[(2, 1)])
    with pytest.raises(ValueError, match="sigma"):
        gaussian_pair_epsilon(0.0, 0.0, 1.0, 1.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        gaussian_pair_epsilon(0.0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        one_shot_epsilon([0.1, float("nan")], [0.0, 0.1], 1e-5)
    with pytest.raises(ValueError, match="dimension"):
        one_shot_epsilon([0.1, 0.2], None, 1e-5)
    with pytest.raises(ValueError, match="not both"):
        one_shot_epsilon([0.1, 0.2], [0.0, 0.1], 1e-5, dimension=5000)
    with pytest.raises(ValueError, match="all equal"):
        one_shot_epsilon([0.1, 0.1], [0.0, 0.1], 1e-5)
    with pytest.raises(ValueError, match="reference_losses"):
        exposure(1.0, [])
    with pytest.raises(ValueError, match="NaN"):
        exposure(1.0, [0.5, float("nan")])
