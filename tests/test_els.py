"""ELS: the user-level mixture accountant, per-example clipping, matched compute, compare.

Fast by default (about a minute): PLDs at a coarse discretisation (1e-2, still an upper
bound), the tiny smoke model, in-process ULS. The 1e-3 reference pin is the slow part.
"""

import dataclasses
import json
import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedsim.errors import ConfigError
from fedsim.privacy.accounting import compute_epsilon, make_accountant, poisson_gaussian_event
from fedsim.privacy.els_accounting import els_epsilon, els_event, group_privacy_epsilon
from fedsim.privacy.mechanisms import GaussianMechanism, binomial_pmf
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


def test_memoised_pld_matches_dp_accounting_pld_bit_for_bit():
    # independent check: dp_accounting's own PLDAccountant on the same composed event
    ev = dp_event.ComposedDpEvent([els_event(1.5, 3, 0.05, 40), poisson_gaussian_event(0.05, 1.0, 10)])
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=COARSE).compose(ev)
    acc = make_accountant("pld", value_discretization_interval=COARSE).compose(ev)
    assert acc.get_epsilon(1e-5) == ref.get_epsilon(1e-5) and acc.get_delta(2.0) == ref.get_delta(2.0)
    # a second query (the budget guard's pattern) reuses the memoised PLDs and agrees
    longer = GaussianMechanism(1.0, 1.5).run_event(0.05, 41, k=3)
    ref2 = pld_privacy_accountant.PLDAccountant(value_discretization_interval=COARSE).compose(longer)
    acc2 = make_accountant("pld", value_discretization_interval=COARSE).compose(longer)
    assert acc2.get_epsilon(1e-5) == ref2.get_epsilon(1e-5)
    # the old run directories' name for it
    assert make_accountant("els_pld").compose(longer).get_epsilon(1e-5) == ref2.get_epsilon(1e-5)


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
    ev = GaussianMechanism(1.0, 2.0).mixture_event(3, 0.1)
    assert isinstance(ev, dp_event.MixtureOfGaussiansDpEvent)
    assert list(ev.sensitivities) == [0.0, 1.0, 2.0, 3.0] and sum(ev.sampling_probs) == pytest.approx(1.0)
    assert binomial_pmf(2, 0.5) == pytest.approx([0.25, 0.5, 0.25])
    assert isinstance(GaussianMechanism(1.0, 0.0).mixture_event(3, 0.1), dp_event.NonPrivateDpEvent)
    assert math.isinf(compute_epsilon(dp_event.NonPrivateDpEvent(), 1e-5, "pld"))
    assert compute_epsilon(dp_event.NoOpDpEvent(), 1e-5, "pld") == 0.0
    with pytest.raises(ValueError, match="k"):
        GaussianMechanism(1.0, 1.0).mixture_event(0, 0.1)
    with pytest.raises(ValueError):  # not a probability: dp_accounting refuses the mixture
        compute_epsilon(GaussianMechanism(1.0, 1.0).mixture_event(2, 1.5), 1e-5, "pld")


def test_els_honours_or_refuses_dp_accountant(tmp_path):
    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.plan import plan_els

    base = [f"run.output_dir={tmp_path}", *FAST, "els.steps=4", "dp.noise_multiplier=2", "dp.epsilon=null"]
    store = build_store(load_config("configs/smoke.yaml", base).data)
    edgeworth = plan_els(load_config("configs/smoke.yaml", base + ["dp.accountant=edgeworth"]), store, group_bound=False)
    assert edgeworth.accountant == "edgeworth" and edgeworth.accountant_options == {"value_discretization_interval": 0.1}
    pld = plan_els(load_config("configs/smoke.yaml", base), store, group_bound=False)
    assert pld.accountant == "pld" and edgeworth.planned_epsilon == pld.planned_epsilon  # its bound is vacuous: PLD
    with pytest.raises(ConfigError, match="dp.accountant=rdp cannot account for the ELS mixture"):
        plan_els(load_config("configs/smoke.yaml", base + ["dp.accountant=rdp"]), store)


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
    from fedsim.plan import uls_user_compute
    from fedsim.config import UlsConfig
    from fedsim.training.local import local_batches

    for n, cap, epochs, steps, bs in [(20, 16, 2, None, 8), (20, 16, 1, 3, 8), (5, 16, 1, 3, 8), (3, None, 3, None, 2),
                                      (40, None, 1, 7, 6)]:
        uls = UlsConfig(max_examples_per_user=cap, local_epochs=epochs, local_steps=steps, batch_size=bs)
        c = n if cap is None else min(n, cap)
        seen = sum(len(b) for b in local_batches(c, bs, epochs, steps, torch.Generator().manual_seed(0)))
        assert uls_user_compute(n, uls) == seen


def test_matched_compute_arithmetic():
    from fedsim.plan import matched_compute

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
    from fedsim.loop import run_els
    from fedsim.plan import plan_els
    from fedsim.privacy.ledger import PrivacyLedger

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", *FAST, "els.expected_batch=0.7", "els.steps=4",
                                              "dp.epsilon=2"])
    store = build_store(cfg.data)
    plan = dataclasses.replace(plan_els(cfg, store), steps=8)  # calibrated for 4: the guard must stop the run
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
    from fedsim.comparison import run_compare
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
    from fedsim.plan import example_sampling_rate

    with pytest.raises(ConfigError, match="larger than the data"):
        example_sampling_rate(500, 100, 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        binomial_pmf(0, 0.1)


def test_kept_examples_are_a_seeded_uniform_cap_without_a_loop_over_users():
    import numpy as np

    from fedsim.plan import kept_examples

    counts = np.array([0, 3, 10, 1, 7])
    users, index = kept_examples(counts, 4, seed=5)
    assert np.bincount(users, minlength=5).tolist() == [0, 3, 4, 1, 4]
    assert all(0 <= i < counts[u] for u, i in zip(users, index))
    assert len(set(zip(users.tolist(), index.tolist()))) == users.size  # no example twice
    again = kept_examples(counts, 4, seed=5)
    assert np.array_equal(again[0], users) and np.array_equal(again[1], index)
    other = kept_examples(counts, 4, seed=6)
    assert not np.array_equal(other[1], index)
    # every example of a large user is kept with probability k / n
    hits = np.zeros(10)
    for seed in range(400):
        u, i = kept_examples(np.array([10]), 4, seed)
        hits[i] += 1
    assert np.allclose(hits / 400, 0.4, atol=0.08)
