"""ELS: the user-level mixture accountant, per-example clipping, matched compute, compare.

Fast by default (about a minute): PLDs at a coarse discretisation (1e-2, still an upper
bound), the tiny smoke model, in-process ULS. The 1e-3 reference pin is the slow part.
"""

import json
import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedsim.errors import ConfigError
from fedsim.privacy.accounting import compute_epsilon, poisson_gaussian_event
from fedsim.privacy.els_accounting import (
    ElsPldAccountant,
    binomial_pmf,
    els_epsilon,
    els_event,
    els_step_event,
    group_privacy_epsilon,
)
from fedsim.rundir import read_diagnostics

COARSE = 1e-2


# -- the user-level accountant -------------------------------------------------------------
def test_reference_value_k4():
    # docs/architecture.md reference values: q=0.01, sigma=1, T=1000, delta=1e-6, k=4 -> 10.015 (mixture PLD at 1e-3)
    assert els_epsilon(1.0, 4, 0.01, 1000, 1e-6, interval=1e-3) == pytest.approx(10.015, abs=2e-3)


def test_k1_is_the_poisson_subsampled_gaussian():
    for q, sigma, steps in [(0.01, 1.0, 1000), (0.2, 2.0, 30)]:
        tight = els_epsilon(sigma, 1, q, steps, 1e-6, interval=COARSE)
        pg = compute_epsilon(poisson_gaussian_event(q, sigma, steps), 1e-6, "pld", value_discretization_interval=COARSE)
        assert tight == pytest.approx(pg, rel=1e-6)
    # and the reference of docs/architecture.md (2.1245 at the default 1e-3 discretisation)
    assert compute_epsilon(poisson_gaussian_event(0.01, 1.0, 1000), 1e-6, "pld") == pytest.approx(2.1245, abs=2e-3)


def test_cached_accountant_matches_dp_accounting_pld():
    # independent check: dp_accounting's own PLDAccountant on the same composed event
    ev = dp_event.ComposedDpEvent([els_event(1.5, 3, 0.05, 40), poisson_gaussian_event(0.05, 1.0, 10)])
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=COARSE)
    ref.compose(ev)
    acc = ElsPldAccountant(COARSE)
    assert acc.epsilon(ev, 1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert acc.delta(ev, 2.0) == pytest.approx(ref.get_delta(2.0), rel=1e-9)
    # a second query (the budget guard's pattern) reuses the cached PLDs and agrees
    longer = dp_event.SelfComposedDpEvent(els_step_event(dp_event.GaussianDpEvent(1.5), 3, 0.05), 41)
    ref2 = pld_privacy_accountant.PLDAccountant(value_discretization_interval=COARSE)
    ref2.compose(longer)
    assert acc.epsilon(longer, 1e-5) == pytest.approx(ref2.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_k_and_q():
    by_k = [els_epsilon(1.5, k, 0.02, 50, 1e-5, interval=COARSE) for k in (1, 2, 4)]
    assert by_k[0] < by_k[1] < by_k[2]
    by_q = [els_epsilon(1.5, 2, q, 50, 1e-5, interval=COARSE) for q in (0.01, 0.02, 0.04)]
    assert by_q[0] < by_q[1] < by_q[2]


@pytest.mark.parametrize("sigma,k,q,steps", [(1.0, 4, 0.01, 1000), (1.5, 16, 0.007, 125), (3.0, 16, 0.007, 125),
                                             (2.0, 2, 0.1, 20)])
def test_group_privacy_bound_is_never_below_the_tight_one(sigma, k, q, steps):
    tight = els_epsilon(sigma, k, q, steps, 1e-5, interval=COARSE)
    group = group_privacy_epsilon(sigma, k, q, steps, 1e-5)
    assert group.epsilon >= tight
    assert group.delta <= 1e-5 * (1 + 1e-9)
    assert group.epsilon == pytest.approx(k * group.example_epsilon)


def test_step_event_and_inputs():
    ev = els_step_event(dp_event.GaussianDpEvent(2.0), 3, 0.1)
    assert isinstance(ev, dp_event.MixtureOfGaussiansDpEvent)
    assert list(ev.sensitivities) == [0.0, 1.0, 2.0, 3.0] and sum(ev.sampling_probs) == pytest.approx(1.0)
    assert binomial_pmf(2, 0.5) == pytest.approx([0.25, 0.5, 0.25])
    assert isinstance(els_step_event(dp_event.GaussianDpEvent(0.0), 3, 0.1), dp_event.NonPrivateDpEvent)
    assert math.isinf(ElsPldAccountant().epsilon(dp_event.NonPrivateDpEvent(), 1e-5))
    assert ElsPldAccountant().epsilon(dp_event.NoOpDpEvent(), 1e-5) == 0.0
    with pytest.raises(ConfigError, match="k"):
        els_step_event(dp_event.GaussianDpEvent(1.0), 0, 0.1)
    with pytest.raises(ConfigError):
        els_step_event(dp_event.GaussianDpEvent(1.0), 2, 1.5)
    with pytest.raises(Exception, match="only Gaussian and LMO"):
        els_step_event(dp_event.LaplaceDpEvent(1.0), 2, 0.1)


# -- per-example clipping ------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def tiny_task(request):
    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.models import build_task

    cfg = load_config("configs/smoke.yaml", [f"model.lora.enabled={request.param}"])
    store = build_store(cfg.data)
    task = build_task(cfg, store, log=lambda *_: None)
    texts = [x for u in range(6) for x in store.train_examples(u)][:7]
    return task, task.batch(texts)


@pytest.mark.parametrize("method", ["hooks", "hooks-ghost", "vmap", pytest.param("opacus", marks=pytest.mark.slow)])
def test_clipped_sum_equals_a_naive_per_example_loop(tiny_task, method):
    from fedsim.training.per_example import HookClipper, make_clipper

    task, batch = tiny_task
    naive = make_clipper(task, "naive")
    free = naive.clip_and_accumulate(batch, 1e9)  # unclipped norms, to choose C mid-range
    clip = float(free.norms.median())
    ref = naive.clip_and_accumulate(batch, clip)
    want = task.flat.flat_grad.clone()
    # hooks-ghost: no memory for per-example gradients, so every eligible weight uses ghost norms
    clipper = HookClipper(task, max_materialised_bytes=0) if method == "hooks-ghost" else make_clipper(task, method)
    try:
        got = clipper.clip_and_accumulate(batch, clip)
    finally:
        clipper.close()
    assert 0 < (ref.norms > clip).sum() < len(ref.norms)  # some clipped, some not
    torch.testing.assert_close(got.norms, ref.norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(task.flat.flat_grad, want, rtol=1e-4, atol=1e-6)
    # an empty Poisson batch is a zero sum, not an error
    empty = {k: v[:0] for k, v in batch.items()}
    assert make_clipper(task, "auto").clip_and_accumulate(empty, clip).size == 0
    assert float(task.flat.flat_grad.abs().sum()) == 0.0


# -- matched compute -----------------------------------------------------------------------
def test_uls_user_compute_matches_the_local_batches():
    from fedsim.compare import uls_user_compute
    from fedsim.config import UlsConfig
    from fedsim.training.local import local_batches

    for n, cap, epochs, steps, bs in [(20, 16, 2, None, 8), (20, 16, 1, 3, 8), (5, 16, 1, 3, 8), (3, None, 3, None, 2),
                                      (40, None, 1, 7, 6)]:
        uls = UlsConfig(max_examples_per_user=cap, local_epochs=epochs, local_steps=steps, batch_size=bs)
        c = n if cap is None else min(n, cap)
        seen = sum(len(b) for b in local_batches(c, bs, epochs, steps, torch.Generator().manual_seed(0)))
        assert uls_user_compute(n, uls) == seen


def test_matched_compute_arithmetic():
    from fedsim.compare import matched_compute

    cp = matched_compute(8000, 557.68, 30, 64)
    assert (cp.uls_rounds, cp.els_steps) == (14, 125)
    assert cp.uls_expected == pytest.approx(14 * 557.68) and cp.els_expected == 125 * 64
    # no budget: ULS's planned rounds set it, ELS matches
    cp = matched_compute(None, 100.0, 30, 50)
    assert cp.budget == 3000 and cp.uls_rounds == 30 and cp.els_steps == 60
    assert matched_compute(10, 100.0, 30, 64).els_steps == 1  # at least one of each
    with pytest.raises(ConfigError):
        matched_compute(100, 0.0, 30, 64)


# -- runs ----------------------------------------------------------------------------------
FAST = ["els.k=4", "els.accounting_interval=0.1", "els.expected_batch=8"]  # coarse PLD: looser, still an upper bound


def test_els_run_handles_empty_batches_and_stops_at_the_budget(tmp_path):
    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.els import plan_els, run_els
    from fedsim.privacy.ledger import PrivacyLedger

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", *FAST, "els.expected_batch=0.7", "els.steps=4",
                                              "dp.epsilon=2"])
    store = build_store(cfg.data)
    plan = plan_els(cfg, store)
    plan.steps = 8  # calibrated for 4 steps: the guard must stop the run before it overspends
    run_dir, s = run_els(cfg, say=lambda *_: None, plan=plan)
    rows = read_diagnostics(run_dir)
    batches = [r["batch"] for r in rows if r["step"] > 0]
    assert 0 in batches  # q M = 0.7: empty batches happen and are stepped through on purpose
    assert s["method"] == "ELS" and s["steps"] == len(batches) and 4 <= s["steps"] < 8
    assert "budget" in s["stop_reason"]
    assert s["epsilon"] <= cfg.dp.epsilon and s["compute_examples"] == sum(batches)
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == s["steps"]
    assert s["group_privacy_epsilon"] >= s["epsilon"]


def test_tiny_compare_writes_both_results(tmp_path):
    from fedsim.compare import run_compare
    from fedsim.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", *FAST])
    out, result = run_compare(cfg, say=lambda *_: None)
    assert (out / "compare.json").is_file() and (out / "compare.png").stat().st_size > 1000
    for name in ("uls", "els"):
        s = json.loads((out / name / "summary.json").read_text())
        assert s["method"] == name.upper() and s["epsilon"] <= cfg.dp.epsilon
        assert s["delta"] == result["delta"]
    cp = result["compute_plan"]
    assert abs(cp["uls_expected"] - cp["els_expected"]) <= max(cp["uls_per_round"], cp["els_batch"])
    assert result["curves"]["ULS"] and result["curves"]["ELS"]


@pytest.mark.parametrize("override,needle", [("els.k=0", "els.k"), ("els.expected_batch=100000", "larger than the data")])
def test_bad_inputs_are_clear_errors(override, needle, tmp_path, capsys):
    from fedsim.cli import main

    rc = main(["compare", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_plan_rejects_a_batch_larger_than_the_data():
    from fedsim.els import sampling_rate
    from fedsim.privacy.els_accounting import check_group_size

    with pytest.raises(ConfigError, match="larger than the data"):
        sampling_rate(500, 100, 4)
    with pytest.raises(ConfigError, match="integer >= 1"):
        check_group_size(0)
