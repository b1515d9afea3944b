"""Contract tests for every accountant (dp_accounting's PrivacyAccountantTest style), the
Edgeworth internals against slow obvious versions, and the `fedsim account` CLI.

One class `AccountantContract` holds what every accountant must do; one subclass per
accountant pins its reference value. PLD uses value_discretization_interval 1e-3 unless a
test needs the tight value (1e-4 is fast for the Poisson Gaussian, slow for mixtures).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from scipy import integrate, stats

from fedsim.privacy.accounting import (
    UnsupportedEventError,
    epsilon,
    make_accountant,
    pld_accountant,
    poisson_gaussian_event,
    rdp_accountant,
)
from fedsim.privacy.calibration import calibrate_noise
from fedsim.privacy.edgeworth import EdgeworthAccountant, EdgeworthApproximation, pllr_moments
from fedsim.privacy.prv import PrvAccountant

# Reference setting (docs/architecture.md, "Reference values"): q=0.01, sigma=1, T=1000, delta=1e-6.
REF = dict(q=0.01, sigma=1.0, steps=1000, delta=1e-6)
PLD_REF_VDI4 = 2.12452  # dp_accounting PLD at value_discretization_interval 1e-4
RDP_REF = 2.4367


def ref_event():
    return poisson_gaussian_event(REF["q"], REF["sigma"], REF["steps"])


def composed(acc, event):
    """A copy of `acc` with `event` composed (accountants are stateful)."""
    return copy.deepcopy(acc).compose(event)


def eps_of(acc, event, delta):
    return epsilon(copy.deepcopy(acc), event, delta)


def delta_of(acc, event, eps):
    return float(composed(acc, event).get_delta(eps))


def pld_tight(event, delta):
    return eps_of(pld_accountant(1e-4), event, delta)


class AccountantContract:
    """What every upper-bound accountant guarantees. Subclasses set `make` and the pins."""

    make = staticmethod(lambda: None)
    ref_value: float = math.nan
    ref_tol: float = 0.0
    # a cheap setting for the many-evaluation tests (monotonicity, calibration)
    small = dict(q=0.05, steps=50, delta=1e-5)

    def acc(self):
        return self.make()

    def eps(self, q, sigma, steps, delta=1e-5):
        return eps_of(self.acc(), poisson_gaussian_event(q, sigma, steps), delta)

    def test_is_registered_upper_bound(self):
        acc = self.acc()
        assert getattr(acc, "is_upper_bound", True)
        assert type(make_accountant(self.name)) is type(acc)

    def test_reference_value(self):
        assert eps_of(self.acc(), ref_event(), REF["delta"]) == pytest.approx(self.ref_value, abs=self.ref_tol)

    def test_never_below_tight_pld(self):
        # An upper bound cannot be below the tight PLD value (up to PLD's own slack).
        got = eps_of(self.acc(), ref_event(), REF["delta"])
        assert got >= PLD_REF_VDI4 - 1e-4

    def test_no_events_is_zero(self):
        acc = self.acc()
        assert eps_of(acc, dp_event.NoOpDpEvent(), 1e-5) == 0.0
        assert eps_of(acc, dp_event.ComposedDpEvent([]), 1e-5) == 0.0
        assert eps_of(acc, dp_event.SelfComposedDpEvent(dp_event.NoOpDpEvent(), 10), 1e-5) == 0.0

    def test_non_private_is_inf(self):
        acc = self.acc()
        assert eps_of(acc, dp_event.NonPrivateDpEvent(), 1e-5) == math.inf
        mixed = dp_event.ComposedDpEvent([poisson_gaussian_event(0.01, 1.0, 5), dp_event.NonPrivateDpEvent()])
        assert eps_of(acc, mixed, 1e-5) == math.inf

    @pytest.mark.parametrize("wrap", ["bare", "composed", "self_composed"])
    def test_unsupported_event_raises(self, wrap):
        bad = dp_event.UnsupportedDpEvent()
        event = {
            "bare": bad,
            "composed": dp_event.ComposedDpEvent([poisson_gaussian_event(0.01, 1.0, 5), bad]),
            "self_composed": dp_event.SelfComposedDpEvent(bad, 3),
        }[wrap]
        acc = self.acc()
        assert not acc.supports(event)
        with pytest.raises(UnsupportedEventError):
            eps_of(acc, event, 1e-5)

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5])
    def test_invalid_delta_raises_value_error(self, delta):
        with pytest.raises(ValueError, match="delta must be in"):
            eps_of(self.acc(), poisson_gaussian_event(0.01, 1.0, 5), delta)

    def test_monotone_in_q_sigma_steps(self):
        q, t, d = self.small["q"], self.small["steps"], self.small["delta"]
        base = self.eps(q, 1.0, t, d)
        assert self.eps(q * 2, 1.0, t, d) > base  # more sampling, more loss
        assert self.eps(q, 1.5, t, d) < base  # more noise, less loss
        assert self.eps(q, 1.0, t * 2, d) > base  # more steps, more loss

    def test_calibration_round_trip(self):
        q, t, d = self.small["q"], self.small["steps"], self.small["delta"]
        target = 1.0  # sigma ~ 1.7: a cheap PLD (few discretisation points per step)
        acc = self.acc()
        sigma = calibrate_noise(lambda s: poisson_gaussian_event(q, s, t), target, d, self.make, guess=1.8)
        assert eps_of(acc, poisson_gaussian_event(q, sigma, t), d) <= target
        assert eps_of(acc, poisson_gaussian_event(q, sigma * (1 - 1e-2), t), d) > target


class TestPld(AccountantContract):
    name = "pld"
    make = staticmethod(lambda: pld_accountant())  # default interval 1e-3
    ref_value, ref_tol = 2.1245, 1.5e-3  # 2.12525 at 1e-3

    @pytest.mark.slow
    def test_reference_value_fine_grid(self):
        assert pld_tight(ref_event(), REF["delta"]) == pytest.approx(PLD_REF_VDI4, abs=2e-5)


class TestRdp(AccountantContract):
    name = "rdp"
    make = staticmethod(rdp_accountant)
    ref_value, ref_tol = RDP_REF, 1e-4

    @pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.0, 1000), (0.1, 2.0, 50), (0.001, 2.0, 1000)])
    def test_rdp_at_least_pld(self, q, sigma, steps):
        ev = poisson_gaussian_event(q, sigma, steps)
        # RDP is looser than PLD; the 1e-3 slack is PLD's discretisation at 1e-4.
        assert eps_of(rdp_accountant(), ev, 1e-5) >= pld_tight(ev, 1e-5) - 1e-3


class TestPrv(AccountantContract):
    name = "prv"
    make = staticmethod(PrvAccountant)
    ref_value, ref_tol = 2.1346, 1e-3  # upper = estimate 2.12452 + eps_error 0.01 (+ delta error)

    def test_bounds_bracket_pld(self):
        b = composed(PrvAccountant(), ref_event()).epsilon_bounds(REF["delta"])
        assert b.lower <= b.estimate <= b.upper
        assert b.estimate == pytest.approx(PLD_REF_VDI4, abs=1e-3)
        assert b.lower <= PLD_REF_VDI4 <= b.upper

    @pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.0, 1000), (0.1, 2.0, 100), (1.0, 5.0, 50)])
    def test_within_one_percent_of_pld(self, q, sigma, steps):
        ev = poisson_gaussian_event(q, sigma, steps)
        prv, pld = eps_of(PrvAccountant(), ev, 1e-5), pld_tight(ev, 1e-5)
        assert pld * (1 - 1e-3) <= prv <= pld * 1.01

    def test_heterogeneous_composition(self):
        parts = [poisson_gaussian_event(0.01, 1.0, 300), poisson_gaussian_event(0.02, 1.5, 200)]
        ev = dp_event.ComposedDpEvent(parts)
        prv, pld = eps_of(PrvAccountant(), ev, 1e-5), pld_tight(ev, 1e-5)
        assert pld * (1 - 1e-3) <= prv <= pld * 1.02

    def test_add_direction_prv_matches_integration(self):
        # cdf of the add-direction PRV against the definition (x ~ N(0, s^2) pushed through L)
        from fedsim.privacy.prv import _PoissonSubsampledGaussianAdd

        q, s = 0.1, 0.7
        prv = _PoissonSubsampledGaussianAdd(q, s)
        x = np.random.default_rng(0).normal(0.0, s, 400_000)
        loss = -np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * s * s))
        for t in (-1.0, -0.1, 0.0, 0.05, 0.2):
            assert prv.cdf(t) == pytest.approx(np.mean(loss <= t), abs=3e-3)

    def test_delta_is_consistent_with_epsilon(self):
        acc = PrvAccountant()
        eps = eps_of(acc, ref_event(), REF["delta"])
        assert delta_of(acc, ref_event(), eps) <= REF["delta"] * 1.001

    def test_mixture_unsupported(self):
        mog = dp_event.MixtureOfGaussiansDpEvent(1.0, [0.0, 1.0, 2.0], [0.9, 0.09, 0.01])
        assert not PrvAccountant().supports(mog)


class TestEdgeworth(AccountantContract):
    name = "edgeworth"
    make = staticmethod(EdgeworthAccountant)
    # The finite-sample bound is vacuous at delta=1e-6: the reported value is PLD (1e-3).
    ref_value, ref_tol = 2.12525, 1e-4

    def test_report_labels_fallback_and_approximation(self):
        r = composed(EdgeworthAccountant(), ref_event()).epsilon_report(REF["delta"])
        assert r.source == "pld-fallback" and math.isinf(r.bound)
        assert r.reported == r.pld
        assert r.approximation == pytest.approx(2.19606, abs=1e-3)  # EW estimate, pinned

    @pytest.mark.parametrize(
        "q,sigma,steps,delta",
        [(0.01, 1.0, 1000, 1e-5), (0.1, 0.8, 30, 1e-5), (0.01, 1.0, 1000, 0.1), (1.0, 30.0, 10_000, 0.05),
         (0.05, 1.0, 200, 0.2)],
    )
    def test_never_below_pld_on_grid(self, q, sigma, steps, delta):
        ev = poisson_gaussian_event(q, sigma, steps)
        acc = EdgeworthAccountant()
        assert eps_of(acc, ev, delta) >= eps_of(acc.pld, ev, delta)
        bound = composed(acc, ev).epsilon_bound(delta)
        if math.isfinite(bound):  # the raw bound must also be above the tight value
            assert bound >= pld_tight(ev, delta) - 1e-3

    def test_bound_is_finite_at_large_delta(self):
        # Where the Berry-Esseen error is below delta the bound is informative.
        r = composed(EdgeworthAccountant(), poisson_gaussian_event(1.0, 30.0, 10_000)).epsilon_report(0.05)
        assert r.source == "edgeworth-bound" and r.reported == r.bound >= r.pld

    def test_gaussian_against_closed_form(self):
        # q=1: the composed PLLR is exactly N(mu^2/2, mu^2), mu = sqrt(T)/sigma, so the
        # Edgeworth approximation is exact and delta(eps) has a closed form.
        sigma, steps, delta = 20.0, 400, 1e-5
        mu = math.sqrt(steps) / sigma

        def exact_delta(e):
            return stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)

        ev = poisson_gaussian_event(1.0, sigma, steps)
        acc = EdgeworthAccountant()
        approx = composed(acc, ev).epsilon_approximation(delta)
        assert exact_delta(approx) == pytest.approx(delta, rel=1e-4)
        assert composed(acc, ev).delta_approximation(1.0) == pytest.approx(exact_delta(1.0), rel=1e-6)
        assert composed(acc, ev).delta_bound(1.0) >= exact_delta(1.0)

    @pytest.mark.parametrize("direction", ["remove", "add"])
    def test_cumulants_match_quadrature(self, direction):
        q, s = 0.02, 0.8
        y, x = pllr_moments(s, (0.0, 1.0), (1 - q, q), direction)
        sign = 1.0 if direction == "remove" else -1.0

        def loss(v):
            return sign * np.logaddexp(math.log1p(-q), math.log(q) + (2 * v - 1) / (2 * s * s))

        base = lambda v: stats.norm.pdf(v, 0, s)  # noqa: E731
        mix = lambda v: (1 - q) * stats.norm.pdf(v, 0, s) + q * stats.norm.pdf(v, 1, s)  # noqa: E731
        p_dens, q_dens = (mix, base) if direction == "remove" else (base, mix)
        for m, dens in ((y, p_dens), (x, q_dens)):
            def central(k, c=0.0):
                return integrate.quad(lambda v: (loss(v) - c) ** k * dens(v), -np.inf, np.inf,
                                      epsabs=1e-14, epsrel=1e-10, limit=200)[0]

            k1 = central(1)
            c2, c3, c4 = central(2, k1), central(3, k1), central(4, k1)
            assert (m.k1, m.k2, m.k3, m.k4) == pytest.approx((k1, c2, c3, c4 - 3 * c2 * c2), rel=1e-7, abs=1e-15)

    def test_mixture_of_gaussians_supported(self):
        # ELS: k=4 examples per user, Binomial(4, 0.01) sensitivity. PLD reference ~10.015.
        k, q = 4, 0.01
        mog = dp_event.MixtureOfGaussiansDpEvent(1.0, list(map(float, range(k + 1))),
                                                 list(stats.binom.pmf(range(k + 1), k, q)))
        ev = dp_event.SelfComposedDpEvent(mog, 1000)
        assert EdgeworthAccountant().supports(ev)
        assert eps_of(EdgeworthApproximation(), ev, 1e-6) == pytest.approx(10.015, rel=0.03)
        assert math.isinf(composed(EdgeworthAccountant(), ev).epsilon_bound(1e-6))  # vacuous: PLD would be reported


class TestEdgeworthApproximation:
    def test_is_labelled_and_not_registered(self):
        assert EdgeworthApproximation.is_upper_bound is False
        with pytest.raises(ValueError):
            make_accountant("edgeworth-approx")

    def test_can_be_optimistic(self):
        # Few steps, skewed PLLR: the estimate is below the PLD upper bound (why it is never reported).
        ev = poisson_gaussian_event(0.1, 0.6, 10)
        assert eps_of(EdgeworthApproximation(), ev, 1e-5) < eps_of(pld_accountant(), ev, 1e-5)


@pytest.mark.parametrize(
    "q,sigma,steps,match",
    [(0.0, 1.0, 10, "q must be in"), (1.5, 1.0, 10, "q must be in"), (-0.1, 1.0, 10, "q must be in"),
     (0.1, 0.0, 10, "noise_multiplier must be a positive"), (0.1, -1.0, 10, "noise_multiplier must be a positive"),
     (0.1, 1.0, 0, "steps must be an integer")],
)
def test_invalid_event_parameters_raise_value_error(q, sigma, steps, match):
    with pytest.raises(ValueError, match=match):
        poisson_gaussian_event(q, sigma, steps)


# --- the `fedsim account` CLI ------------------------------------------------------------------

from fedsim.account import main as account_main  # noqa: E402


def _run_cli(capsys, *args):
    code = account_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_lists_every_accountant(capsys):
    code, out, err = _run_cli(capsys, "--q", "0.05", "--sigma", "2", "--steps", "20", "--delta", "1e-5", "--vdi", "1e-3")
    assert code == 0, err
    for name in ("pld", "rdp", "prv", "edgeworth", "edgeworth-approx", "upper bound", "approximation"):
        assert name in out


def test_cli_json(capsys):
    code, out, _ = _run_cli(capsys, "--q", "0.05", "--sigma", "2", "--steps", "20", "--delta", "1e-5", "--json",
                            "--vdi", "1e-3")
    assert code == 0
    res = {r["accountant"]: r for r in json.loads(out)["results"]}
    assert set(res) == {"pld", "rdp", "prv", "edgeworth", "edgeworth-approx"}
    assert res["edgeworth-approx"]["kind"].startswith("approximation")
    assert all(r["kind"] == "upper bound" for n, r in res.items() if n != "edgeworth-approx")
    assert res["edgeworth"]["epsilon"] >= res["pld"]["epsilon"]
    assert res["rdp"]["epsilon"] >= res["pld"]["epsilon"] and all(r["seconds"] >= 0 for r in res.values())


def test_cli_find_sigma(capsys):
    code, out, _ = _run_cli(capsys, "--q", "0.05", "--steps", "20", "--delta", "1e-5", "--epsilon", "1",
                            "--find", "sigma", "--accountants", "rdp,pld", "--vdi", "1e-3", "--json")
    assert code == 0
    res = {r["accountant"]: r for r in json.loads(out)["results"]}
    assert res["pld"]["sigma"] < res["rdp"]["sigma"]
    assert res["pld"]["epsilon_at_sigma"] <= 1.0 and res["rdp"]["epsilon_at_sigma"] <= 1.0


def test_cli_els_mixture(capsys):
    code, out, _ = _run_cli(capsys, "--q", "0.01", "--sigma", "1", "--steps", "1000", "--delta", "1e-6", "--k", "4",
                            "--accountants", "rdp,edgeworth-approx", "--json")
    assert code == 0
    res = {r["accountant"]: r for r in json.loads(out)["results"]}
    assert res["rdp"]["note"] == "unsupported event" and res["rdp"]["epsilon"] is None
    assert res["edgeworth-approx"]["epsilon"] == pytest.approx(10.015, rel=0.03)


@pytest.mark.parametrize(
    "args",
    [["--q", "0", "--sigma", "1", "--steps", "10", "--delta", "1e-5"],
     ["--q", "1.5", "--sigma", "1", "--steps", "10", "--delta", "1e-5"],
     ["--q", "0.1", "--sigma", "0", "--steps", "10", "--delta", "1e-5"],
     ["--q", "0.1", "--sigma", "-2", "--steps", "10", "--delta", "1e-5"],
     ["--q", "0.1", "--sigma", "1", "--steps", "10", "--delta", "0"],
     ["--q", "0.1", "--sigma", "1", "--steps", "10", "--delta", "1"],
     ["--q", "abc"],
     ["--q", "0.1", "--steps", "10", "--delta", "1e-5"],
     ["/no/such/run_dir"]],
)
def test_cli_bad_args_return_2(capsys, args):
    code, out, err = _run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in err


def _write_run(tmp_path, accountant="pld", tamper=1.0):
    from fedsim.privacy.accounting import compute_epsilon
    from fedsim.privacy.ledger import PrivacyLedger

    run = tmp_path / "run"
    run.mkdir()
    ledger = PrivacyLedger(run / "privacy_ledger.jsonl")
    one = dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.2))
    for step in range(40):
        ledger.record(step, one)
    delta = 1e-5
    eps = compute_epsilon(ledger.total_event(), delta, accountant)
    (run / "summary.json").write_text(json.dumps({"epsilon": eps * tamper, "delta": delta, "accountant": accountant}))
    return run


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_cli_run_dir_matches(tmp_path, capsys, accountant):
    code, out, _ = _run_cli(capsys, str(_write_run(tmp_path, accountant)))
    assert code == 0
    assert "matches" in out and "40 releases" in out


def test_cli_run_dir_reports_tampered_summary(tmp_path, capsys):
    code, out, _ = _run_cli(capsys, str(_write_run(tmp_path, tamper=0.99)), "--json")
    assert code == 1
    assert json.loads(out)["match"] is False


def test_cli_run_dir_missing_ledger(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"epsilon": 1.0, "delta": 1e-5, "accountant": "pld"}))
    code, _, err = _run_cli(capsys, str(tmp_path))
    assert code == 2 and err.startswith("error: ") and "privacy_ledger.jsonl" in err


@pytest.mark.parametrize("q,sigma", [(0.05, 1.0), (0.01, 0.7), (0.3, 2.0)])
def test_memoised_pld_equals_dp_accountings_pld_accountant_bit_for_bit(q, sigma):
    """fedsim's PLD accountant builds each subsampled-Gaussian PLD once (the budget guard asks
    every round); epsilon and delta must be exactly dp_accounting's, whatever the event mix."""
    from dp_accounting.pld import pld_privacy_accountant

    from fedsim.privacy.accounting import make_accountant

    unit = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    other = dp_event.PoissonSampledDpEvent(q / 2, dp_event.LaplaceDpEvent(3.0))  # goes through the library path
    acc = make_accountant("pld")  # each query below composes a fresh copy
    for event in [dp_event.SelfComposedDpEvent(unit, n) for n in (1, 2, 7, 100)] + [
            dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(unit, 5), other,
                                      dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(2 * sigma))])]:
        ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        ref.compose(event)
        assert eps_of(acc, event, 1e-5) == ref.get_epsilon(1e-5)
        assert delta_of(acc, event, 1.0) == ref.get_delta(1.0)
