"""Known values, calibration round-trips, clipping and noise of the privacy core."""

import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.errors import BudgetExceededError
from fedsim.privacy.randomness import SecretRandomness
from fedsim.privacy import (
    GaussianMechanism,
    PrivacyLedger,
    calibrate_gaussian_noise_multiplier,
    compute_epsilon,
    per_user_clip,
    poisson_gaussian_event,
)
from fedsim.privacy.accounting import make_accountant, pld_accountant
from fedsim.privacy.budget import PrivacyBudget
from fedsim.privacy.ledger import compress, event_from_dict, event_to_dict


def test_reference_values_from_dp_accounting():
    # docs/architecture.md reference values: q=0.01, sigma=1, T=1000, delta=1e-6 -> PLD 2.1245, RDP 2.4367
    ev = poisson_gaussian_event(0.01, 1.0, 1000)
    assert pld_accountant(1e-4).compose(ev).get_epsilon(1e-6) == pytest.approx(2.1245, abs=5e-4)
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
    with pytest.raises(ValueError):
        poisson_gaussian_event(args["q"], args["sigma"], args["steps"])


@pytest.mark.parametrize("delta", [0.0, 1.0, 2.0, -1e-5])
def test_invalid_delta_is_refused(delta):
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon(poisson_gaussian_event(0.1, 1.0, 10), delta)


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError, match="accountant"):
        make_accountant("magic")


def test_privacy_imports_nothing_of_fedsim_but_its_leaf_modules():
    # privacy/ is pure math: no config, no models, no Flower (docs/architecture.md)
    import ast
    import pathlib

    allowed = ("fedsim.privacy", "fedsim.errors", "fedsim.compat")
    for path in pathlib.Path("fedsim/privacy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedsim"):
                assert node.module.startswith(allowed), f"{path} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("fedsim") or alias.name.startswith(allowed), path


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
    for ev in (mech.sampled_event(0.1), mech.mixture_event(4, 0.1), mech.run_event(0.1, 10)):
        assert math.isinf(compute_epsilon(ev, 1e-5, "rdp")) and math.isinf(compute_epsilon(ev, 1e-5, "pld"))


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


def test_budget_composes_runs_once_and_matches_the_ledger(tmp_path):
    # the live accountant composes each finished run of identical releases once and the current
    # run as one SelfComposedDpEvent: bit-identical to the ledger's run-length form, live and
    # rebuilt from the file
    path = tmp_path / "ledger.jsonl"
    led = PrivacyLedger(path)
    a = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.1))
    b = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(2.0))
    budget = PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None)
    for i, ev in enumerate([a, a, a, b, b, a]):
        led.record(i + 1, ev)
        budget.compose(ev)
    rebuilt = PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None, PrivacyLedger(path).events())
    for extra in (a, b):
        expected = compute_epsilon(compress(led.events() + [extra]), 1e-5)
        assert budget.check(extra) == expected and rebuilt.check(extra) == expected
    assert budget.spent() == compute_epsilon(led.total_event(), 1e-5) == rebuilt.spent()
    assert led.total_event() == compress(led.events())
    assert led.has(4, b) and not led.has(4, a) and not led.has(7, a)
    assert PrivacyLedger().total_event() == dp_event.NoOpDpEvent()
    assert PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None).spent() == 0.0


def test_ledger_refuses_unknown_event_types():
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match="unknown privacy event"):
        event_from_dict({"type": "os.system", "x": 1})


def test_budget_guard_stops_before_overspending():
    q, steps, target, delta = 0.1, 5, 3.0, 1e-5
    sigma = calibrate_gaussian_noise_multiplier(q, steps, target, delta)
    ev = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    budget = PrivacyBudget(lambda: make_accountant("pld"), delta, target)
    for _ in range(steps):
        budget.check(ev)
        budget.compose(ev)
    assert budget.spent() <= target
    with pytest.raises(BudgetExceededError):
        budget.check(ev)
    assert budget.releases == steps
