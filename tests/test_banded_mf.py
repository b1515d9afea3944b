"""Banded matrix-factorization noise (dp.mechanism: banded_mf): the strategy, cyclic Poisson
sampling, the noise recurrence, the amplified accounting, the ledger, resume and the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from safetensors.torch import load_file

from fedsim.config import load_config
from fedsim.privacy import banded_mf as mf
from fedsim.privacy.accounting import epsilon, make_accountant
from fedsim.privacy.ledger import PrivacyLedger
from fedsim.privacy.mechanisms import BandedMFMechanism, GaussianMechanism
from fedsim.privacy.randomness import NOISE_CHUNK, SecretRandomness

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"say": lambda *_: None}
FAST = ["els.k=2", "els.expected_batch=8", "els.accounting_interval=0.1"]  # quick ELS calibrations


def _mech(bands: int, sigma: float = 0.9, rounds: int = 12, strategy: str = "sqrt", clip: float = 1.3):
    return BandedMFMechanism.configured(bands=bands, strategy=strategy, rounds=rounds)(clip, sigma)


# -- the strategy -------------------------------------------------------------------------------------


def test_banded_sqrt_coefficients_column_norms_and_identity_at_one_band():
    c = mf.sqrt_coefficients(6)
    assert list(c) == [math.comb(2 * k, k) / 4**k for k in range(6)]
    # with every band kept, the Toeplitz square root squares to the prefix-sum matrix A
    full = mf.strategy_matrix(mf.sqrt_coefficients(8), 8)
    assert np.allclose(full @ full, np.tril(np.ones((8, 8))))
    for b in (2, 3, 5):
        s = mf.BandedStrategy.build(b, "sqrt", 10)
        C = mf.strategy_matrix(np.array(s.coefficients), 10)
        assert np.allclose(np.triu(C, 1), 0) and np.allclose(np.tril(C, -b), 0)  # b-banded, lower triangular
        assert np.linalg.norm(C, axis=0).max() == pytest.approx(1.0, abs=1e-12)  # zeta = 1
        assert np.allclose(np.linalg.inv(C)[:, 0], mf.inverse_coefficients(np.array(s.coefficients), 10))
        assert np.allclose(s.noise_std_factors(10), np.linalg.norm(np.linalg.inv(C), axis=1))
    one = mf.BandedStrategy.build(1, "sqrt", 7)
    assert one.coefficients == (1.0,) and (mf.strategy_matrix(np.array(one.coefficients), 7) == np.eye(7)).all()


def test_optimized_strategy_is_normalised_and_never_worse_than_the_banded_sqrt():
    c = np.array([1.0, 0.4, 0.2, 0.1])
    value, grad = mf._log_error_and_grad(c, 40)
    numeric = [(mf._log_error_and_grad(c + 1e-7 * np.eye(4)[j], 40)[0] - value) / 1e-7 for j in range(4)]
    assert np.allclose(grad, numeric, rtol=1e-4, atol=1e-6)
    for b, T in ((2, 30), (4, 200), (8, 1000)):
        opt, sqrt = mf.BandedStrategy.build(b, "optimized", T), mf.BandedStrategy.build(b, "sqrt", T)
        assert np.linalg.norm(opt.coefficients) == pytest.approx(1.0) and opt.coefficients[0] > 0
        assert opt.error() <= sqrt.error()
    assert mf.BandedStrategy.build(8, "optimized", 1000).error() < 0.9 * mf.BandedStrategy.build(8, "sqrt", 1000).error()
    with pytest.raises(ValueError, match="larger than the 3 rounds"):
        mf.BandedStrategy.build(4, "sqrt", 3)


# -- accounting ---------------------------------------------------------------------------------------


def test_one_band_is_dp_fedavgs_event_and_epsilon_exactly():
    q, sigma, T, delta = 0.01, 1.0, 1000, 1e-6
    band1, gauss = _mech(1, sigma, T), GaussianMechanism(1.3, sigma)
    assert band1.run_event(q, T) == gauss.run_event(q, T) and band1.sampled_event(q) == gauss.sampled_event(q)
    for name in ("pld", "rdp"):
        assert epsilon(make_accountant(name), band1.run_event(q, T), delta) == \
            epsilon(make_accountant(name), gauss.run_event(q, T), delta)
    assert epsilon(make_accountant("pld"), band1.run_event(q, T), delta) == pytest.approx(2.1245, abs=1e-3)  # dp_accounting PLD, the known value
    # through the plan: the same calibrated sigma and planned epsilon as dp.mechanism gaussian
    from fedsim.plan import plan_uls

    plans = [plan_uls(load_config(ROOT / "configs/smoke.yaml", over), 20)
             for over in (["dp.mechanism=gaussian"], ["dp.mechanism=banded_mf", "dp.banded_mf.bands=1"])]
    assert plans[0].mechanism.noise_multiplier == plans[1].mechanism.noise_multiplier
    assert plans[0].planned_epsilon == plans[1].planned_epsilon and plans[0].event == plans[1].event


def test_b_bands_are_ceil_t_over_b_subsampled_gaussians_at_rate_b_q():
    q, sigma, T, delta = 0.01, 1.0, 1000, 1e-6
    eps = {}
    for b in (1, 2, 4, 8):
        event = _mech(b, sigma, T).run_event(q, T)
        assert event == dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(b * q, dp_event.GaussianDpEvent(sigma)), math.ceil(T / b))
        eps[b] = epsilon(make_accountant("pld"), event, delta)
        # an independent accountant on the same event: RDP is a looser bound, never below
        assert epsilon(make_accountant("rdp"), event, delta) >= eps[b] - 1e-9
    assert _mech(3, sigma, 10).run_event(q, 10).count == 4  # ceil(10 / 3)
    # at equal sigma, correlating over more bands (fewer, denser participations) costs more epsilon
    assert eps[1] < eps[2] < eps[4] < eps[8]
    with pytest.raises(ValueError, match="must be in"):
        _mech(8, sigma, T).run_event(0.2, T)  # p = 1.6


def test_the_ledger_and_budget_count_the_worst_group():
    from fedsim.privacy.budget import PrivacyBudget

    event = dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0))
    ledger = PrivacyLedger()
    budget = PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None)
    for step, group in [(1, 0), (2, 1), (3, 0), (4, 1), (5, 0), (5, 0)]:  # round 5 redone (a secure resume)
        budget.compose(event, group)
        ledger.record(step, event, group=group, groups=2)
    assert ledger.total_event() == dp_event.SelfComposedDpEvent(event, 4)  # group 0: rounds 1, 3, 5, 5
    assert budget.spent() == epsilon(make_accountant("pld"), ledger.total_event(), 1e-5)
    # without groups every release composes: the grouped ledger must be strictly cheaper
    flat = PrivacyLedger()
    for step in range(1, 7):
        flat.record(step, event)
    assert flat.total_event() == dp_event.SelfComposedDpEvent(event, 6)
    # a group-1 release below the worst count changes nothing; the next group-0 one does
    assert budget.check(event, 1) == budget.spent() < budget.check(event, 0)
    rebuilt = PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None, ledger.events(), ledger.groups())
    assert rebuilt.spent() == budget.spent()


def test_group_indices_of_different_partitions_are_not_merged():
    """A resume whose edited config changed the bands but kept p = b q (the same event): group 1 of 3
    and group 1 of 2 are different users. Rounds 1..7 with b = 3 (groups 0, 1, 2: 3, 2, 2 rounds), round
    8 with b = 2 (group 1): user 3 (group 0 of 3, group 1 of 2) took part in 4 releases."""
    from fedsim.privacy.budget import PrivacyBudget

    event = dp_event.PoissonSampledDpEvent(0.3, dp_event.GaussianDpEvent(1.0))
    ledger = PrivacyLedger()
    budget = PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None)
    entries = [(t, (t - 1) % 3, 3) for t in range(1, 8)] + [(8, 1, 2)]
    for step, group, groups in entries:
        budget.check(event, group, groups)
        ledger.record(step, event, group=group, groups=groups)
        budget.compose(event, group, groups)
    worst = max(sum(1 for _, g, n in entries if u % n == g) for u in range(6))
    assert worst == 4
    assert ledger.total_event() == dp_event.SelfComposedDpEvent(event, 4)
    assert budget.spent() == epsilon(make_accountant("pld"), ledger.total_event(), 1e-5)
    rebuilt = PrivacyBudget(lambda: make_accountant("pld"), 1e-5, None, ledger.events(), ledger.groups(),
                            ledger.partitions())
    assert rebuilt.spent() == budget.spent()


# -- cyclic Poisson sampling --------------------------------------------------------------------------


def test_cyclic_poisson_samples_only_the_rounds_group_at_rate_b_q():
    from fedsim import sampling

    CyclicPoissonSampler, PoissonSampler = sampling.CyclicPoissonSampler, sampling.PoissonSampler
    participation_sampler = sampling.participation_sampler
    key = SecretRandomness.from_seed(3)
    n, b, q, rounds = 1003, 4, 0.05, 400
    sampler = participation_sampler(n, q, b, key, "uls-cohort")
    assert isinstance(sampler, CyclicPoissonSampler) and sampler.p == pytest.approx(0.2)
    hits = np.zeros(n)
    for t in range(1, rounds + 1):
        cohort = sampler.sample(t)
        assert (cohort % b == (t - 1) % b).all() and (np.diff(cohort) > 0).all() and cohort.max() < n
        hits[cohort] += 1
    rate = hits / (rounds / b)  # each user's group comes round rounds / b times
    assert abs(rate.mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / (n * rounds / b))
    assert hits.min() > 0  # every group (and user) is reached
    # one group: exactly DP-FedAvg's Poisson sample, draw for draw
    one = participation_sampler(n, q, 1, key, "uls-cohort")
    assert isinstance(one, PoissonSampler)
    for t in (1, 2, 7):
        assert (CyclicPoissonSampler(n, q, 1, key, "uls-cohort").sample(t) == one.sample(t)).all()
    with pytest.raises(ValueError, match="in-group sampling rate"):
        CyclicPoissonSampler(n, 0.3, 4, key, "uls-cohort")


# -- the noise ----------------------------------------------------------------------------------------


def test_one_band_noise_is_dp_fedavgs_noise_bit_for_bit():
    d = NOISE_CHUNK + 5000  # two chunks
    key = SecretRandomness.from_seed(11)
    gauss, band1 = GaussianMechanism(1.3, 0.7), _mech(1, 0.7, 5)
    process = band1.noise_process(key, "uls-noise")
    for step in (1, 2, 3):
        x = torch.linspace(-1, 1, d)
        a, metrics_a = gauss.add_noise(x.clone(), key.stream("uls-noise", step))
        b, metrics_b = process.add(x.clone(), step)
        assert torch.equal(a, b) and metrics_a["noise_std"] == metrics_b["noise_std"]
    assert process.memory_bytes == 0


def _noise_rounds(mech, key, rounds, d, start=1, process=None):
    process = process or mech.noise_process(key, "uls-noise")
    return process, torch.stack([process.add(torch.zeros(d), t)[0] for t in range(start, rounds + 1)]).double()


@pytest.mark.parametrize("strategy", ["sqrt", "optimized"])
def test_noise_has_the_covariance_its_strategy_implies(strategy):
    T, b, d, sigma, clip = 6, 3, NOISE_CHUNK + 40_000, 0.8, 1.5
    mech = _mech(b, sigma, T, strategy, clip)
    process, noise = _noise_rounds(mech, SecretRandomness.from_seed(5), T, d)
    assert process.memory_bytes == (b - 1) * d * 8  # O(b d): the last b - 1 vectors w
    Cinv = np.linalg.inv(mf.strategy_matrix(np.array(mech.strategy.coefficients), T))
    expect = (sigma * clip) ** 2 * Cinv @ Cinv.T
    for cols in (slice(0, NOISE_CHUNK), slice(NOISE_CHUNK, d)):  # each chunk keeps its own state
        x = noise[:, cols].numpy()
        emp = x @ x.T / x.shape[1]
        n = x.shape[1]
        se = np.sqrt((np.outer(np.diag(expect), np.diag(expect)) + expect**2) / n)
        assert (np.abs(emp - expect) < 5 * se).all(), (emp, expect)
    assert (expect[np.triu_indices(T, 1)] < -0.05 * (sigma * clip) ** 2).any()  # really correlated, not i.i.d.
    # the released per-round std is sigma C times the row norm of C^{-1}
    fresh = mech.noise_process(SecretRandomness.from_seed(6), "uls-noise")
    stds = [fresh.add(torch.zeros(10), t)[1]["noise_std"] for t in range(1, T + 1)]
    assert np.allclose(stds, sigma * clip * np.sqrt(np.diag(Cinv @ Cinv.T)))


def test_reproducible_resume_rebuilds_the_state_and_secure_resume_restarts_it():
    T, b, d = 7, 3, 1000
    mech = _mech(b, 1.0, T)
    key = SecretRandomness.from_seed(2)
    _, full = _noise_rounds(mech, key, T, d)
    _, resumed = _noise_rounds(mech, key, T, d, start=5)  # a new process at round 5: replays 1..4
    assert torch.equal(full[4:], resumed)
    # secure mode: a new key and no state on disk; the correlation restarts at the resumed round
    secure = SecretRandomness(b"k" * 32, reproducible=False)
    process, restarted = _noise_rounds(mech, secure, T, d, start=5)
    assert process.restarts == [5]
    from fedsim.privacy.randomness import snap_to_grid

    w5 = secure.stream("uls-noise", 5).normal(d).div_(mech.strategy.coefficients[0]).mul_(1.0 * 1.3)
    assert torch.equal(restarted[0], snap_to_grid(w5, 1.3).float().double())  # w_5 = z_5 / c_0: no past state


# -- end to end ---------------------------------------------------------------------------------------


def _cfg(out, *extra):
    return load_config(ROOT / "configs/smoke.yaml", [f"run.output_dir={out}", "run.rounds=6", "run.checkpoint_every=1",
                                                     "run.eval_every=3", "dp.mechanism=banded_mf",
                                                     "dp.banded_mf.bands=3", *extra])


def test_uls_smoke_run_with_banded_mf_and_fedsim_account_rechecks_it(tmp_path, capsys):
    from fedsim.cli import main
    from fedsim.loop import run_uls

    run_dir, s = run_uls(_cfg(tmp_path, "dp.banded_mf.strategy=optimized"), **QUIET)
    assert s["steps"] == 6 and s["epsilon"] == pytest.approx(s["planned_epsilon"]) and s["epsilon"] <= 8.0
    assert s["mechanism"]["bands"] == 3 and s["mechanism"]["mechanism"] == "banded_mf"
    assert math.isfinite(s["eval_loss_after"])
    entries = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    assert [e["group"] for e in entries] == [0, 1, 2, 0, 1, 2] and {e["groups"] for e in entries} == {3}
    assert entries[0]["event"]["sampling_probability"] == pytest.approx(3 * 5 / 20)  # p = b q
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["epsilon"] for r in rows][:3] == [rows[0]["epsilon"]] * 3  # one participation per user so far
    assert rows[3]["epsilon"] > rows[2]["epsilon"]
    # docs/metrics.md documents every field an MF run adds (metrics rows, summary.json, nested keys)
    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    fields = set().union(*(r.keys() for r in rows)) | set(s) | {f"mechanism.{k}" for k in s["mechanism"]}
    assert not sorted(f for f in fields if f"`{f}`" not in doc)
    capsys.readouterr()
    assert main(["account", str(run_dir)]) == 0 and "matches" in capsys.readouterr().out
    # a ledger without the groups composes every round: the re-check must catch it
    for e in entries:
        e.pop("group"), e.pop("groups")
    (run_dir / "privacy_ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert main(["account", str(run_dir)]) == 1 and "DOES NOT MATCH" in capsys.readouterr().out


def test_sigkill_then_reproducible_resume_is_bit_identical(tmp_path):
    from fedsim.loop import resume, run_uls

    ref_dir, ref = run_uls(_cfg(tmp_path / "ref"), **QUIET)
    crash = [f"run.output_dir={tmp_path / 'crash'}", "run.rounds=6", "run.checkpoint_every=1", "run.eval_every=3",
             "dp.mechanism=banded_mf", "dp.banded_mf.bands=3", "simulation.faults.server_crash_round=5"]
    code = ("import sys; sys.path.insert(0, '.'); from fedsim.config import load_config; from fedsim.loop import run_uls;"
            f"run_uls(load_config('configs/smoke.yaml', {crash!r}), say=lambda *_: None)")
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == -9, p.stderr[-2000:]
    run_dir = tmp_path / "crash" / "smoke"
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 5
    _, res = resume(run_dir, **QUIET)
    a, b = (load_file(str(d / "final_weights.safetensors")) for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res["epsilon"] == ref["epsilon"] and len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 6


def test_secure_resume_counts_the_redone_round_for_its_group_and_writes_no_noise_state(tmp_path):
    from fedsim.checkpoint import load_checkpoint, save_checkpoint
    from fedsim.cli import main
    from fedsim.loop import resume, run_uls

    run_dir, first = run_uls(_cfg(tmp_path, "dp.reproducible=false", "dp.noise_multiplier=1.0", "dp.epsilon=50"),
                             **QUIET)
    ptr = json.loads((run_dir / "checkpoint.json").read_text())  # weights, optimizer, public RNG: no noise state
    assert all(k in ("weights", "rng.torch") or k.startswith("opt.") for k in load_file(str(run_dir / ptr["tensors"])))
    assert not any("noise" in k or "mf" in k for k in ptr)
    # as if the process died right after round 4's release was recorded (rounds 5, 6 never ran)
    (run_dir / "summary.json").unlink()
    c = load_checkpoint(run_dir)
    save_checkpoint(run_dir, step=3, weights=c["weights"], optimizer_state=c["optimizer_state"])
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    lines = (run_dir / "privacy_ledger.jsonl").read_text().splitlines()[:4]
    (run_dir / "privacy_ledger.jsonl").write_text("\n".join(lines) + "\n")
    _, res = resume(run_dir, **QUIET)
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert [e["step"] for e in ledger.entries] == [1, 2, 3, 4, 4, 5, 6]
    assert ledger.groups() == [0, 1, 2, 0, 0, 1, 2]  # group 0 took part 3 times, the others twice
    assert ledger.total_event().count == 3 and res["epsilon"] > first["epsilon"]
    assert main(["account", str(run_dir)]) == 0


@pytest.mark.parametrize("over,needle", [
    (["dp.banded_mf.bands=4", "run.rounds=3"], "larger than the 3 planned rounds"),
    (["dp.banded_mf.bands=0"], "dp.banded_mf.bands"),
    (["dp.banded_mf.bands=5", "run.rounds=6"], "bands x q"),
    (["dp.banded_mf.strategy=cholesky"], "dp.banded_mf.strategy"),
    (["dp.lmo={G_k: 1}"], "cannot be combined"),
    (["dp.mechanism=lmo", "dp.banded_mf.bands=2"], "cannot be combined"),
])
def test_bad_parameters_are_one_line_errors_and_create_no_run_dir(tmp_path, capsys, over, needle):
    from fedsim.cli import main

    out = tmp_path / "runs"
    args = ["run", str(ROOT / "configs/smoke.yaml"), "--set", f"run.output_dir={out}", "--set", "dp.mechanism=banded_mf"]
    rc = main([*args, *(a for o in over for a in ("--set", o))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_els_with_banded_mf_is_refused_and_compare_runs_els_with_gaussian_noise(tmp_path, capsys):
    from fedsim.cli import main
    from fedsim.comparison import run_compare

    rc = main(["run", str(ROOT / "configs/smoke.yaml"), "--method", "els", "--set", f"run.output_dir={tmp_path / 'x'}",
               "--set", "dp.mechanism=banded_mf", "--set", "dp.banded_mf.bands=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "ULS mechanism" in err[0] and not (tmp_path / "x").exists()
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"run.output_dir={tmp_path}", *FAST, "compare.methods=[uls,els]",
                                                    "dp.mechanism=banded_mf", "dp.banded_mf.bands=2"])
    out, result = run_compare(cfg, **QUIET)
    assert result["uls"]["mechanism"]["mechanism"] == "banded_mf" and result["uls"]["mechanism"]["bands"] == 2
    assert result["els"]["mechanism"]["mechanism"] == "gaussian"
    assert any("independent Gaussian" in n for n in result["notes"]) and "independent Gaussian" in capsys.readouterr().out
    for m in ("uls", "els"):
        assert result[m]["epsilon"] <= 8.0
        assert load_config(out / m / "config.yaml")  # each arm's config reloads (for a resume)


def test_sweep_accepts_banded_mf_and_its_bands_as_an_axis(tmp_path):
    from fedsim.config import read_config_file
    from fedsim.plan import plan_uls
    from fedsim.sweeps import Sweep, parse_grid

    grid = parse_grid(["dp.banded_mf.bands=1,2,4"])
    sweep = Sweep(tmp_path / "s", read_config_file(ROOT / "configs/smoke.yaml"),
                  ["dp.mechanism=banded_mf", "run.rounds=8"], grid, 1, ["uls"])
    sigmas = []
    for cell, seed, _ in sweep.jobs():
        plan = plan_uls(sweep.config_for(cell, seed), 20)
        assert plan.mechanism.bands == cell["dp.banded_mf.bands"]
        sigmas.append(plan.mechanism.noise_multiplier)
    assert len(set(sigmas)) == 3  # each band count is calibrated to the budget on its own


def test_the_audit_regenerates_a_banded_runs_cyclic_cohorts_and_correlated_noise(tmp_path):
    """An auditor holding the reproducible key must regenerate what the run drew: the cyclic Poisson
    cohorts (a canary only in its group's rounds) and the correlated noise sigma C (C^{-1} z)_t, not
    DP-FedAvg's Poisson cohorts and independent noise (which left the key-known statistics blind)."""
    from types import SimpleNamespace

    from fedsim.auditing.auditor import audit_config, regenerate_cohorts, regenerate_noise_projections
    from fedsim.auditing.canaries import Canaries, with_canaries
    from fedsim.mean_estimation_run import build_vector_store
    from fedsim.plan import plan_uls

    b, T = 3, 9
    cfg = load_config(ROOT / "configs" / "mean_estimation.yaml", [
        f"run.output_dir={tmp_path}", "dp.epsilon=4", "data.num_users=60", f"run.rounds={T}",
        "uls.expected_cohort=12", "dp.reproducible=true", "dp.mechanism=banded_mf", f"dp.banded_mf.bands={b}"])
    acfg, n = audit_config(cfg, "ULS", canaries=30, task="mean-estimation")
    base, mu = build_vector_store(acfg)
    store = with_canaries(base, acfg)
    plan = plan_uls(acfg, store.num_users, mu.numel())
    canaries = Canaries.from_config(acfg, n)
    steps = list(range(1, T + 1))
    cohorts = regenerate_cohorts(acfg, plan, canaries, steps)
    assert cohorts.sum() > 0
    for i, t in enumerate(steps):  # canary j (user n + j) is only ever sampled in its group's rounds
        outside = (np.arange(canaries.count) + n) % b != (t - 1) % b
        assert not cohorts[i, outside].any()
    # the noise: sigma C (C^{-1} Z) from the same keystream, projected on each canary's direction
    d = mu.numel()
    directions = canaries.directions(d).double()
    proj = regenerate_noise_projections(acfg, SimpleNamespace(plan=plan, directions=directions, steps=steps,
                                                              canaries=canaries))
    key = SecretRandomness.from_seed(acfg.run.seed)
    Z = torch.stack([key.stream("uls-noise", t).normal(d) for t in steps]).numpy()
    Cinv = np.linalg.inv(mf.strategy_matrix(np.array(plan.mechanism.strategy.coefficients), T))
    noise = plan.mechanism.noise_std() * Cinv @ Z
    assert np.allclose(proj, noise @ directions.numpy().T, atol=1e-3 * plan.mechanism.noise_std())


def test_cohort_workers_spread_a_cyclic_round_over_their_buckets():
    """users_per_client > 1: a banded-MF round samples only users u = g mod b; bucketing by u mod B put
    the whole round in one message whenever B and b share a factor (here b = B = 4). Buckets must
    still be fixed by the user's id alone (a lost message drops a set of users fixed by their ids)."""
    from types import SimpleNamespace

    from strategies.uls_strategy import UlsStrategy

    s = UlsStrategy(num_users=400, dimension=3, sampling_rate=0.02, clip_norm=1.0, users_per_client=2,
                    randomness=SecretRandomness.from_seed(0), participation_groups=4)  # B = ceil(8 / 2) = 4
    grid = SimpleNamespace(get_node_ids=lambda: [11, 22, 33, 44])
    from flwr.app import ArrayRecord, ConfigRecord

    from fedsim.simulate import InProcessGrid

    InProcessGrid.__init__(object.__new__(InProcessGrid), None, 1)  # sets Flower task ids for Message()
    for t in range(1, 9):
        msgs = list(s.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
        users = [list(m.content["config"]["user-ids"]) for m in msgs]
        assert all(u % 4 == (t - 1) % 4 for us in users for u in us)
        if sum(map(len, users)) >= 4:
            assert len(msgs) >= 2, users  # not one message holding the whole round
        for us in users:  # a bucket is a function of the id: (u // b) mod B
            assert len({(u // 4) % 4 for u in us}) == 1
