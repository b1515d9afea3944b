"""Adaptive clipping (Andrew et al. 2021, arXiv 1905.03871; fedsim/privacy/adaptive_clipping.py):
the clip tracks a quantile, its count costs exactly the noise split, every client path clips with
the round's C, resume is bit-identical, bad parameters are one-line errors."""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting import dp_event
from safetensors.torch import load_file
from scipy import stats

from fedsim.config import load_config
from fedsim.privacy.accounting import epsilon, make_accountant
from fedsim.privacy.adaptive_clipping import (
    AdaptiveClipGaussianMechanism,
    combined_noise_multiplier,
    update_noise_multiplier,
)
from fedsim.privacy.ledger import PrivacyLedger
from fedsim.privacy.mechanisms import GaussianMechanism
from fedsim.privacy.randomness import SecretRandomness

SMOKE = "configs/smoke.yaml"
# the smoke config's cohort is 5: the paper's default count noise (z_b = 5 / 10) is below its
# calibrated z (0.59), so the tests give the count more noise
ADAPTIVE = "dp.adaptive_clip={target_quantile: 0.5, learning_rate: 0.5, count_noise_multiplier: 5, initial_clip: 0.05}"


def _quiet(*_):
    pass


# -- the math -----------------------------------------------------------------------------------------


def test_noise_split_is_one_gaussian_with_the_combined_multiplier():
    z, zb = 1.0, 5.0
    zd = update_noise_multiplier(z, zb)
    assert zd == pytest.approx((1 - 1 / 25) ** -0.5) and zd > z
    assert combined_noise_multiplier(zd, zb) == pytest.approx(z)
    # sensitivity of (sum / (z_delta C), centered count / sigma_b) with sigma_b = z_b / 2 is 1 / z
    mech = AdaptiveClipGaussianMechanism(0.3, z, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=zb,
                                         expected_count=50)
    shift = math.hypot(mech.clip_norm / mech.noise_std(), 0.5 / mech.count_noise_std())
    assert shift == pytest.approx(1 / z)
    assert mech.sampled_event(0.01) == dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(z))
    assert mech.mixture_event(3, 0.1) == GaussianMechanism(0.3, z).mixture_event(3, 0.1)  # ELS: the same mixture
    with pytest.raises(ValueError, match="must exceed"):
        update_noise_multiplier(1.0, 1.0)


def test_count_noise_has_std_sigma_b_and_comes_from_the_stream():
    mech = AdaptiveClipGaussianMechanism(1.0, 1.0, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=8.0,
                                         expected_count=1000)
    r = SecretRandomness.from_seed(1)
    noise = []
    for t in range(3000):
        mech.load_state_dict(None)
        released = mech.adapt_clip(500, 1000, r.stream("uls-clip-count-noise", t))  # centered count 0
        noise.append((released["noisy_unclipped_frac"] - 0.5) * 1000)
    assert np.std(noise) == pytest.approx(4.0, rel=0.05)  # sigma_b = z_b / 2
    again = mech.adapt_clip(500, 1000, r.stream("uls-clip-count-noise", 2999))
    assert (again["noisy_unclipped_frac"] - 0.5) * 1000 == noise[-1]  # a pure function of (key, purpose, step)


@pytest.mark.parametrize("gamma", [0.5, 0.8])
@pytest.mark.parametrize("count_noise", [0.0, 1.0], ids=["noiseless", "count-noise"])
def test_the_clip_converges_to_the_target_quantile_of_lognormal_norms(gamma, count_noise):
    """Norms ~ lognormal(0, 1): the gamma quantile is exp(Phi^-1(gamma)). From C_0 = 0.01 (100x too
    small) and 600 rounds of ~200 contributions, the clip's geometric mean over the last 200 rounds
    is within 5% of it (measured: 0.4% and 1.5% noiseless, 0.5% and 2.7% with z = 1, sigma_b = 10)."""
    rng = np.random.default_rng(0)
    r = SecretRandomness.from_seed(0)
    mech = AdaptiveClipGaussianMechanism(0.01, count_noise, target_quantile=gamma, learning_rate=0.2,
                                         count_noise_multiplier=20.0, expected_count=200)
    assert mech.count_noise_std() == (10.0 if count_noise else 0.0)
    clips = []
    for t in range(600):
        norms = rng.lognormal(0.0, 1.0, rng.binomial(2000, 0.1))
        clips.append(mech.clip_norm)
        mech.adapt_clip(int((norms <= mech.clip_norm).sum()), norms.size, r.stream("clip-count-noise", t))
    target = math.exp(stats.norm.ppf(gamma))
    assert clips[0] < target / 50
    assert math.exp(np.mean(np.log(clips[-200:]))) == pytest.approx(target, rel=0.05)


# -- epsilon --------------------------------------------------------------------------------------------

Q, T, DELTA = 0.01, 1000, 1e-6
EPS_Z1 = 2.1245  # PLD, Poisson-subsampled Gaussian z = 1 (dp_accounting 0.6.0; docs DESIGN reference)


def _pld_epsilon(mech) -> float:
    return epsilon(make_accountant("pld"), mech.run_event(Q, T), DELTA)


def test_epsilon_at_the_same_combined_noise_equals_the_fixed_clip():
    fixed = GaussianMechanism(1.0, 1.0)
    adaptive = AdaptiveClipGaussianMechanism(1.0, 1.0, target_quantile=0.5, learning_rate=0.2,
                                             count_noise_multiplier=5.0, expected_count=100)
    assert _pld_epsilon(fixed) == pytest.approx(EPS_Z1, abs=1e-3)
    assert _pld_epsilon(adaptive) == _pld_epsilon(fixed)
    assert adaptive.noise_std() > fixed.noise_std()  # the update pays for the count


def test_epsilon_at_the_same_update_noise_exceeds_the_fixed_clip_by_the_count_only():
    """z_delta = 1 plus a count with z_b = 5 is the Gaussian with z = (1 + 1/25)^-1/2 = 0.98058:
    epsilon 2.1245 -> 2.2182 (dp_accounting 0.6.0 PLD), and no more."""
    zd, zb = 1.0, 5.0
    z = combined_noise_multiplier(zd, zb)
    assert z == pytest.approx(0.980581, abs=1e-6)
    adaptive = AdaptiveClipGaussianMechanism(1.0, z, target_quantile=0.5, learning_rate=0.2,
                                             count_noise_multiplier=zb, expected_count=100)
    assert adaptive.update_noise_multiplier == pytest.approx(zd)
    direct = epsilon(make_accountant("pld"), dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(z)), T), DELTA)
    assert _pld_epsilon(adaptive) == direct
    assert direct == pytest.approx(2.2182, abs=1e-3)
    assert direct > _pld_epsilon(GaussianMechanism(1.0, zd)) + 0.03
    # a noisier count costs less: z_b -> infinity gives back the fixed clip's epsilon
    quiet = combined_noise_multiplier(zd, 1e6)
    assert epsilon(make_accountant("pld"), GaussianMechanism(1.0, quiet).run_event(Q, T), DELTA) == pytest.approx(
        _pld_epsilon(GaussianMechanism(1.0, zd)), abs=1e-4)


def test_calibration_gives_the_adaptive_plan_the_fixed_plans_combined_noise(smoke_cfg):
    from fedsim.config import config_from_dict
    from fedsim.plan import plan_uls

    raw = json.loads(smoke_cfg.to_json())
    fixed = plan_uls(smoke_cfg, 20)
    adaptive = plan_uls(config_from_dict(raw, [ADAPTIVE]), 20)
    assert adaptive.mechanism.noise_multiplier == fixed.mechanism.noise_multiplier
    assert adaptive.planned_epsilon == fixed.planned_epsilon <= smoke_cfg.dp.epsilon
    assert adaptive.event == fixed.event
    zd = adaptive.mechanism.update_noise_multiplier
    assert zd == pytest.approx(update_noise_multiplier(fixed.mechanism.noise_multiplier, 5.0))
    assert zd > fixed.mechanism.noise_multiplier
    assert adaptive.mechanism.clip_norm == 0.05  # initial_clip, not dp.clip_norm


# -- end to end -----------------------------------------------------------------------------------------


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _check_clip_chain(metrics, start=0.05, eta=0.5, gamma=0.5):
    """Each row's clip is the previous row's released C_{t+1} = C_t exp(-eta (b~ - gamma)), from C_0 = start."""
    assert metrics[0]["clip_norm"] == start
    for a, b in itertools.pairwise(metrics):
        assert b["clip_norm"] == a["next_clip_norm"]
    for a in metrics:
        assert a["next_clip_norm"] == pytest.approx(a["clip_norm"] * math.exp(-eta * (a["noisy_unclipped_frac"] - gamma)),
                                                    rel=1e-12)
    assert len({m["clip_norm"] for m in metrics}) > 1


@pytest.mark.parametrize("path", [
    [],
    ["uls.users_per_client=3"],
    ["uls.users_per_client=3", "uls.vectorise=true", "uls.local_steps=1", "uls.batch_size=4"],
], ids=["one-user-per-node", "cohort-workers", "vectorised"])
def test_uls_run_adapts_the_clip_and_every_client_path_clips_with_the_rounds_clip(tmp_path, capsys, path):
    """dp.clip_norm=100 while the adaptive clip starts at 0.05: a client that clipped with
    dp.clip_norm (not the C the server sent) returns sums above n C and the server drops them."""
    from fedsim.cli import main

    rc = main(["run", SMOKE, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=6", "--set", ADAPTIVE,
               "--set", "dp.clip_norm=100", *[arg for p in path for arg in ("--set", p)]])
    assert rc == 0, capsys.readouterr().err
    run_dir = tmp_path / "smoke"
    metrics = _rows(run_dir / "metrics.jsonl")[1:]
    diags = _rows(run_dir / "diagnostics.jsonl")[2:]  # past the header and round 0
    assert len(diags) == len(metrics) == 6
    _check_clip_chain(metrics)
    assert all(d["dropped_replies"] == 0 for d in diags)
    assert sum(d["users"] for d in diags) > 0 and all(d["contributions"] == d["users"] for d in diags)
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    z = summary["mechanism"]["noise_multiplier"]
    assert summary["mechanism"]["adaptive_clip"]["update_noise_multiplier"] > z
    assert set(ledger.events()) == {dp_event.PoissonSampledDpEvent(summary["q"], dp_event.GaussianDpEvent(z))}
    assert summary["mechanism_state"]["clip_norm"] == metrics[-1]["next_clip_norm"]
    assert summary["epsilon"] <= summary["target_epsilon"]
    # `fedsim account RUN_DIR` recomputes the same epsilon from the ledger
    capsys.readouterr()
    assert main(["account", str(run_dir)]) == 0
    assert "recomputed from the ledger" in capsys.readouterr().out


def test_account_run_dir_catches_an_adaptive_run_whose_ledger_was_understated(tmp_path, capsys):
    """The re-check is real: a ledger rewritten with the update's own (larger) noise multiplier, as if the
    count were free, no longer gives the summary's epsilon."""
    from fedsim.cli import main

    assert main(["run", SMOKE, "--set", f"run.output_dir={tmp_path}", "--set", ADAPTIVE]) == 0
    run_dir = tmp_path / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    z, zd = summary["mechanism"]["noise_multiplier"], summary["mechanism"]["adaptive_clip"]["update_noise_multiplier"]
    path = run_dir / "privacy_ledger.jsonl"
    path.write_text(path.read_text().replace(json.dumps(z), json.dumps(zd)))
    capsys.readouterr()
    assert main(["account", str(run_dir)]) != 0


ROUNDS = 6


def test_sigkill_then_resume_of_an_adaptive_run_is_bit_identical(tmp_path):
    from fedsim.loop import resume, run_uls

    base = [f"run.rounds={ROUNDS}", "run.checkpoint_every=1", "run.eval_every=3", ADAPTIVE]
    ref_dir, ref = run_uls(load_config(SMOKE, [f"run.output_dir={tmp_path / 'ref'}", *base]), say=_quiet)
    overrides = [f"run.output_dir={tmp_path / 'crash'}", *base, "simulation.faults.server_crash_round=4"]
    code = ("import sys; sys.path.insert(0, '.');"
            "from fedsim.config import load_config; from fedsim.loop import run_uls;"
            f"run_uls(load_config({SMOKE!r}, {overrides!r}), say=lambda *_: None)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    run_dir = tmp_path / "crash" / "smoke"
    ptr = json.loads((run_dir / "checkpoint.json").read_text())
    assert ptr["step"] == 3 and ptr["mechanism_state"]["clip_norm"] != 0.05  # C_4, moved by 3 releases
    _, res = resume(run_dir, say=_quiet)
    a = load_file(str(ref_dir / "final_weights.safetensors"))
    b = load_file(str(run_dir / "final_weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert _rows(run_dir / "metrics.jsonl") == _rows(ref_dir / "metrics.jsonl")  # every C_t and b~, bit for bit
    assert res["epsilon"] == ref["epsilon"] and len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == ROUNDS
    assert res["mechanism_state"] == ref["mechanism_state"]


def test_els_run_adapts_its_per_example_clip_and_accounts_the_same_mixture(tmp_path, capsys):
    from fedsim.cli import main

    rc = main(["run", SMOKE, "--method", "els", "--set", f"run.output_dir={tmp_path}", "--set", ADAPTIVE,
               "--set", "els.steps=6", "--set", "els.expected_batch=8", "--set", "els.k=2",
               "--set", "els.accounting_interval=0.05", "--set", "dp.adaptive_clip.count_noise_multiplier=20"])
    assert rc == 0, capsys.readouterr().err
    run_dir = tmp_path / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    z = summary["mechanism"]["noise_multiplier"]
    events = PrivacyLedger(run_dir / "privacy_ledger.jsonl").events()
    assert events == [GaussianMechanism(1.0, z).mixture_event(2, summary["q"])] * 6
    metrics = _rows(run_dir / "metrics.jsonl")[1:]
    _check_clip_chain(metrics)
    diags = _rows(run_dir / "diagnostics.jsonl")[2:]
    assert len(diags) == 6 and all(d["contributions"] == d["batch"] - d["dropped_examples"] for d in diags)
    capsys.readouterr()
    assert main(["account", str(run_dir)]) == 0


# -- bad parameters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, needle", [
    ("dp.adaptive_clip.target_quantile=0", "target_quantile"),
    ("dp.adaptive_clip.target_quantile=1", "target_quantile"),
    ("dp.adaptive_clip.target_quantile=1.5", "target_quantile"),
    ("dp.adaptive_clip.learning_rate=0", "learning_rate"),
    ("dp.adaptive_clip.learning_rate=-0.2", "learning_rate"),
    ("dp.adaptive_clip.initial_clip=0", "initial_clip"),
    ("dp.adaptive_clip.initial_clip=-1", "initial_clip"),
    ("dp.adaptive_clip.count_noise_multiplier=0", "count_noise_multiplier"),
    ("dp.adaptive_clip.count_noise_multiplier=0.3", "must exceed the combined noise multiplier"),
    ("dp.adaptive_clip.qantile=0.5", "unknown key"),
    ("dp.mechanism=lmo", "dp.adaptive_clip needs dp.mechanism gaussian"),
])
def test_bad_adaptive_parameters_exit_2_with_one_line_and_no_run_dir(override, needle, tmp_path, capsys):
    from fedsim.cli import main

    out = tmp_path / "runs"
    rc = main(["run", SMOKE, "--set", f"run.output_dir={out}", "--set", "dp.adaptive_clip={}", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists() or not any(out.iterdir())


# -- compare and sweep --------------------------------------------------------------------------------------

FAST = ["els.k=2", "els.expected_batch=8", "els.accounting_interval=0.1"]  # quick ELS calibrations
LOUD_COUNT = "dp.adaptive_clip.count_noise_multiplier=20"  # above both arms' calibrated sigma on the smoke config


def test_compare_runs_both_arms_and_the_reference_with_an_adaptive_clip(tmp_path):
    from fedsim.comparison import run_compare

    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", *FAST, ADAPTIVE, LOUD_COUNT])
    out, _ = run_compare(cfg, say=_quiet)
    for name in ("uls", "els", "reference"):
        s = json.loads((out / name / "summary.json").read_text())
        assert s["mechanism"]["mechanism"] == "gaussian-adaptive-clip", name
        clips = [m["clip_norm"] for m in _rows(out / name / "metrics.jsonl")[1:]]
        assert clips[0] == 0.05 and len(set(clips)) > 1, name
    for name in ("uls", "els"):
        s = json.loads((out / name / "summary.json").read_text())
        assert s["epsilon"] <= cfg.dp.epsilon and s["mechanism"]["adaptive_clip"]["count_noise_multiplier"] == 20
    ref = json.loads((out / "reference" / "summary.json").read_text())
    assert ref["mechanism"]["adaptive_clip"]["count_noise_std"] == 0  # no noise anywhere: epsilon = inf


def test_sweep_grids_over_the_target_quantile(tmp_path, capsys):
    from fedsim.cli import main

    out = tmp_path / "s"
    rc = main(["sweep", SMOKE, "--grid", "dp.adaptive_clip.target_quantile=0.2,0.8", "--seeds", "1", "--jobs", "1",
               "--methods", "uls", "--out", str(out), "--set", "simulation.backend=inprocess", "--set", LOUD_COUNT,
               "--set", "run.rounds=6"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["dp.adaptive_clip.target_quantile"] for r in rows] == [0.2, 0.8]
    final = []
    for r in rows:
        s = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert s["mechanism"]["adaptive_clip"]["target_quantile"] == r["dp.adaptive_clip.target_quantile"]
        final.append(s["mechanism_state"]["clip_norm"])
    assert final[0] < final[1]  # a higher quantile ends at a larger clip (same seed, same C_0 = dp.clip_norm)


def test_els_adaptive_clip_false_keeps_a_fixed_per_example_clip_beside_an_adaptive_uls():
    from fedsim.data import build_store
    from fedsim.plan import plan_els, plan_uls

    cfg = load_config(SMOKE, [*FAST, ADAPTIVE, LOUD_COUNT, "els.adaptive_clip=false", "els.clip_norm=0.3"])
    store = build_store(cfg.data)
    els = plan_els(cfg, store, steps=5, group_bound=False)
    assert type(els.mechanism) is GaussianMechanism and els.mechanism.clip_norm == 0.3
    assert isinstance(plan_uls(cfg, store.num_users).mechanism, AdaptiveClipGaussianMechanism)
    adaptive_els = plan_els(load_config(SMOKE, [*FAST, ADAPTIVE, LOUD_COUNT]), store, steps=5, group_bound=False)
    assert isinstance(adaptive_els.mechanism, AdaptiveClipGaussianMechanism)
    assert adaptive_els.mechanism.clip_norm == 0.05 and adaptive_els.mechanism.expected_count == 8
