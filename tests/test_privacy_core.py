"""Known values, calibration round-trips, clipping and noise of the privacy core."""

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.errors import BudgetExceededError, ConfigError
from fedsim.privacy.randomness import SecretRandomness
from fedsim.privacy import (
    GaussianMechanism,
    PrivacyLedger,
    calibrate_gaussian_noise_multiplier,
    compute_epsilon,
    per_user_clip,
    poisson_gaussian_event,
)
from fedsim.privacy.accounting import PldAccountant, make_accountant
from fedsim.privacy.budget import PrivacyBudget
from fedsim.privacy.ledger import compress, event_from_dict, event_to_dict


def test_reference_values_from_dp_accounting():
    # docs/architecture.md reference values: q=0.01, sigma=1, T=1000, delta=1e-6 -> PLD 2.1245, RDP 2.4367
    ev = poisson_gaussian_event(0.01, 1.0, 1000)
    assert PldAccountant(1e-4).epsilon(ev, 1e-6) == pytest.approx(2.1245, abs=5e-4)
    assert compute_epsilon(ev, 1e-6, "rdp") == pytest.approx(2.4367, abs=5e-4)


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.05, 0.8, 30, 1e-5), (0.2, 1.5, 10, 1e-6), (1.0, 2.0, 5, 1e-5)])
def test_epsilon_equals_direct_dp_accounting_call(q, sigma, steps, delta):
    ev = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(ev)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(ev)
    assert compute_epsilon(poisson_gaussian_event(q, sigma, steps), delta, "pld") == pytest.approx(pld.get_epsilon(delta), rel=1e-9)
    assert compute_epsilon(poisson_gaussian_event(q, sigma, steps), delta, "rdp") == pytest.approx(rdp.get_epsilon(delta), rel=1e-9)


def test_calibration_round_trip_is_tight_and_never_over_budget():
    q, steps, target, delta = 0.05, 30, 4.0, 1e-5
    sigma = calibrate_gaussian_noise_multiplier(q, steps, target, delta)
    assert compute_epsilon(poisson_gaussian_event(q, sigma, steps), delta) <= target
    # smallest noise: 1% less noise overspends
    assert compute_epsilon(poisson_gaussian_event(q, sigma * 0.99, steps), delta) > target


def test_pld_is_tighter_than_rdp_so_needs_less_noise():
    s_pld = calibrate_gaussian_noise_multiplier(0.05, 30, 4.0, 1e-5, "pld")
    s_rdp = calibrate_gaussian_noise_multiplier(0.05, 30, 4.0, 1e-5, "rdp")
    assert s_pld < s_rdp


@pytest.mark.parametrize("bad", [dict(q=0.0), dict(q=1.5), dict(sigma=0.0), dict(sigma=-1.0), dict(steps=0)])
def test_invalid_event_parameters_are_refused(bad):
    args = dict(q=0.1, sigma=1.0, steps=10) | bad
    with pytest.raises(ConfigError):
        poisson_gaussian_event(args["q"], args["sigma"], args["steps"])


@pytest.mark.parametrize("delta", [0.0, 1.0, 2.0, -1e-5])
def test_invalid_delta_is_refused(delta):
    with pytest.raises(ConfigError, match="delta"):
        compute_epsilon(poisson_gaussian_event(0.1, 1.0, 10), delta)


def test_unknown_accountant_is_a_config_error():
    with pytest.raises(ConfigError, match="accountant"):
        make_accountant("magic")


def test_per_user_clip_bounds_norm_and_keeps_direction():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        u = torch.randn(1000, generator=gen) * scale
        orig = u.clone()
        clipped, norm = per_user_clip(u, 1.0)
        assert norm == pytest.approx(float(orig.norm()), rel=1e-6)
        assert float(clipped.norm()) <= 1.0
        cos = float(torch.dot(clipped, orig) / (clipped.norm() * orig.norm()))
        assert cos == pytest.approx(1.0, abs=1e-6)
        if float(orig.norm()) < 1.0:
            assert torch.equal(clipped, orig)


def test_gaussian_noise_has_std_sigma_c():
    mech = GaussianMechanism(clip_norm=0.5, noise_multiplier=1.3)
    noisy, metrics = mech.add_noise(torch.zeros(200_000), SecretRandomness.from_seed(1).stream("noise", 0))
    assert float(noisy.std()) == pytest.approx(0.65, rel=0.01)
    assert metrics["noise_std"] == pytest.approx(0.65)
    assert isinstance(mech.dp_event(), dp_event.GaussianDpEvent)


def test_zero_noise_is_non_private_event_with_infinite_epsilon():
    mech = GaussianMechanism(1.0, 0.0)
    ev = dp_event.PoissonSampledDpEvent(0.1, mech.dp_event())
    assert math.isinf(compute_epsilon(ev, 1e-5, "rdp"))


def test_ledger_round_trips_events_and_compresses(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = PrivacyLedger(path)
    ev = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.1))
    for i in range(5):
        led.record(i + 1, ev, cohort=3)
    again = PrivacyLedger(path)
    assert len(again) == 5
    assert again.events()[0] == ev
    assert compress(again.events()) == dp_event.SelfComposedDpEvent(ev, 5)
    assert event_from_dict(event_to_dict(ev)) == ev
    assert compute_epsilon(again.total_event(), 1e-5) == pytest.approx(compute_epsilon(poisson_gaussian_event(0.1, 1.1, 5), 1e-5))


def test_ledger_run_length_form_matches_the_full_history(tmp_path):
    # the budget check composes the ledger's run-length form (O(runs), not O(releases)): it must
    # equal compressing every recorded event, live and after a reload, with extra events appended
    path = tmp_path / "ledger.jsonl"
    led = PrivacyLedger(path)
    a = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.1))
    b = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(2.0))
    for i, ev in enumerate([a, a, a, b, b, a]):
        led.record(i + 1, ev)
    for ledger in (led, PrivacyLedger(path)):
        assert ledger.total_event() == compress(ledger.events())
        assert ledger.total_event([a, a]) == compress(ledger.events() + [a, a])
        assert ledger.total_event([b]) == compress(ledger.events() + [b])
        assert ledger.has(4, b) and not ledger.has(4, a) and not ledger.has(7, a)
    assert PrivacyLedger().total_event() == dp_event.NoOpDpEvent()


def test_ledger_refuses_unknown_event_types():
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match="unknown privacy event"):
        event_from_dict({"type": "os.system", "x": 1})


def test_budget_guard_stops_before_overspending():
    q, steps, target, delta = 0.1, 5, 3.0, 1e-5
    sigma = calibrate_gaussian_noise_multiplier(q, steps, target, delta)
    ev = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    budget = PrivacyBudget(PrivacyLedger(), make_accountant("pld"), delta, target)
    for i in range(steps):
        budget.check(ev)
        budget.ledger.record(i + 1, ev)
    assert budget.spent() <= target
    with pytest.raises(BudgetExceededError):
        budget.check(ev)
    assert len(budget.ledger) == steps
