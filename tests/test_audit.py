"""`fedsim audit`: canaries in one run, the one-run lower bound against the reported epsilon.

A correct mechanism is "consistent" whatever the seed (the bound holds at 95%: these runs are
far from the edge), and each deliberately broken one (fedsim/privacy/sabotage.py) is flagged.
Small runs: the smoke model, 20 real users, epsilon 1, delta 1e-6, in-process.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.auditing.auditor import run_audit
from fedsim.config import load_config
from fedsim.privacy import sabotage

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda *a, **k: None

#: q = 0.5 for 10 rounds / steps (ELS: 20 users x k 2 = 40 kept examples, batch 20)
DENSE = ["run.rounds=10", "uls.expected_cohort=10", "els.steps=10", "els.expected_batch=20"]
#: q = 0.01 for 100 rounds / steps: subsampling amplifies a lot, so knowing the cohorts breaks it
SPARSE = ["run.rounds=100", "uls.expected_cohort=0.2", "els.steps=100", "els.expected_batch=0.4"]


def audit_cfg(tmp_path, shape, *extra):
    return load_config(ROOT / "configs" / "smoke.yaml", [
        f"run.output_dir={tmp_path}", "dp.epsilon=1", "dp.delta=1e-6", "els.k=2", "run.eval_every=1000",
        "els.eval_every=1000", *shape, *extra])


@pytest.mark.parametrize("method", ["ULS", "ELS"])
@pytest.mark.parametrize("shape", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_a_correct_mechanism_is_consistent_over_seeds(tmp_path, method, shape):
    """Secure mode: fresh OS-entropy keys, so every repetition has new coins, cohorts and noise;
    the auditor also tries regenerating the cohorts and noise from run.seed, which a secure key
    defeats. Three seeds of the dense shape, two of the sparse one (100 rounds each)."""
    for seed in range(3 if shape is DENSE else 2):
        cfg = audit_cfg(tmp_path, shape, "dp.reproducible=false", f"run.seed={seed}")
        _, result = run_audit(cfg, method, canaries=500, say=QUIET, auditor_knows_sampling=True)
        assert result["verdict"] == "consistent", result["lower_bound"]
        assert result["lower_bound"]["epsilon"] <= result["reported_epsilon"] <= 1.0
        assert set(result["lower_bound"]["by_statistic"]) == {"final-model", "all-iterates", "differenced",
                                                               "cohort-known", "noise-known"}


@pytest.mark.parametrize("method", ["ULS", "ELS"])
@pytest.mark.parametrize("kind, statistic", [("no-clip", "final-model"), ("weak-noise", "final-model"),
                                             ("reused-noise", "differenced")])
def test_each_broken_mechanism_is_flagged(tmp_path, method, kind, statistic):
    cfg = audit_cfg(tmp_path, DENSE)
    with sabotage.sabotaged(kind):  # reproducible (deterministic); the auditor does not use the key
        run_dir, result = run_audit(cfg, method, canaries=500, say=QUIET, auditor_knows_sampling=False)
    assert result["verdict"] == "VIOLATION"
    assert result["sabotage"] == [kind]
    by = result["lower_bound"]["by_statistic"]
    assert by[statistic]["epsilon_lower_bound"] > 2 * result["reported_epsilon"], by
    # the run's own records still state the calibrated noise: only the audit can tell
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["noise"] == result["noise"] and summary["epsilon"] == result["reported_epsilon"]


@pytest.mark.parametrize("method", ["ULS", "ELS"])
def test_a_leaked_sampling_key_is_flagged(tmp_path, method):
    """dp.reproducible: the key is a function of run.seed, so the auditor regenerates who was
    sampled when, and each release's noise; without that knowledge the same run is consistent.
    (The default: an audit of a reproducible run uses the key, as anyone could.)"""
    cfg = audit_cfg(tmp_path, SPARSE, "dp.reproducible=true")
    _, result = run_audit(cfg, method, canaries=1000, say=QUIET)
    by = result["lower_bound"]["by_statistic"]
    assert result["verdict"] == "VIOLATION" and result["auditor_knows_sampling"], by
    assert by["cohort-known"]["epsilon_lower_bound"] > result["reported_epsilon"], by
    assert by["noise-known"]["epsilon_lower_bound"] > 2 * result["reported_epsilon"], by
    # blind to the key, the same statistics find nothing (the secure-mode runs above: consistent)
    assert max(v["epsilon_lower_bound"] for k, v in by.items() if not k.endswith("-known")) <= 1.0


def test_sabotage_is_reachable_from_python_only(tmp_path, capsys):
    from fedsim.cli import main
    from fedsim.config import path_keys

    keys = [".".join(k) for k in path_keys()]
    assert not [k for k in keys if "sabot" in k or "broken" in k]
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "sabot" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown sabotage"), sabotage.sabotaged("no-noise"):
        pass
    cfg = audit_cfg(tmp_path, DENSE, "simulation.backend=ray")
    # a Ray worker would never see the switch
    with sabotage.sabotaged("no-clip"), pytest.raises(Exception, match="inprocess"):
        run_audit(cfg, "ULS", canaries=10, say=QUIET)
    assert not sabotage.active_kinds() and not list(Path(tmp_path).iterdir())


def test_canaries_never_count_toward_the_real_users(tmp_path):
    from fedsim.loop import run

    cfg = audit_cfg(tmp_path, DENSE)
    run_dir, result = run_audit(cfg, "ULS", canaries=300, say=QUIET)
    _, plain = run(audit_cfg(tmp_path, DENSE), "ULS", QUIET)
    assert result["diagnostics"]["eval_loss_before"] == plain["eval_loss_before"]  # the same evaluation set
    rows = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()[1:]]
    rows = [r for r in rows if "users" in r]
    assert rows and all(r["users"] <= r["cohort"] <= 20 for r in rows)  # 20 real users: canaries are not counted
    assert sum(r["canaries"] for r in rows) > 0
    assert sum(r["examples"] for r in rows) == json.loads((run_dir / "summary.json").read_text())["compute_examples"]
    # q is the configured run's: expected cohort scaled by (users + canaries) / users
    assert result["q"] == pytest.approx(0.5) and result["canaries"]["canaries"] == 300
    assert result["canaries"]["included"] + result["canaries"]["held_out"] == 300


def test_cli_writes_audit_json_and_png_and_prints_a_verdict(tmp_path, capsys):
    from fedsim.cli import main

    args = [f"run.output_dir={tmp_path}", "dp.epsilon=1", "dp.delta=1e-6", "dp.reproducible=false", *DENSE]
    code = main(["audit", str(ROOT / "configs" / "smoke.yaml"), "--canaries", "200",
                 *[a for s in args for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 0 and "\nconsistent: reported epsilon" in out
    (run_dir,) = [p for p in Path(tmp_path).iterdir() if p.is_dir()]
    result = json.loads((run_dir / "audit.json").read_text())
    assert result["verdict"] == "consistent" and len(result["included"]) == 200
    assert {"final-model", "all-iterates"} <= set(result["one_shot"])
    assert "epsilon_cost" in result and result["sabotage"] == []
    assert (run_dir / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exit_code_is_1_on_a_violation(tmp_path, capsys):
    from fedsim.cli import main

    args = [f"run.output_dir={tmp_path}", "dp.epsilon=1", "dp.delta=1e-6", "dp.reproducible=false", *DENSE]
    with sabotage.sabotaged("weak-noise"):
        code = main(["audit", str(ROOT / "configs" / "smoke.yaml"), "--canaries", "400",
                     *[a for s in args for a in ("--set", s)]])
    assert code == 1 and "\nVIOLATION: reported epsilon" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["run", "--set", "audit.canaries=10"], "only by `fedsim audit`"),
    (["audit", "--canaries", "1"], "at least 2 canaries"),
    (["audit", "--set", "dp.epsilon=null"], "needs a private run"),
])
def test_bad_audit_requests_are_one_line_errors_and_leave_nothing(tmp_path, capsys, argv, needle):
    from fedsim.cli import main

    cmd, rest = argv[0], argv[1:]
    code = main([cmd, str(ROOT / "configs" / "smoke.yaml"), "--set", f"run.output_dir={tmp_path}", *rest])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not list(Path(tmp_path).iterdir())


def test_text_canaries_are_scored_by_exposure(tmp_path):
    """Black-box canaries: the tiny model memorises little in a few rounds, so the broken run
    (noise 10x weaker) also trains longer (5 local epochs, 30 rounds) for the sequences to show."""
    learn = ["uls.local_epochs=5", "run.rounds=30"]
    with sabotage.sabotaged("weak-noise"):
        _, broken = run_audit(audit_cfg(tmp_path, DENSE, *learn), "ULS", canaries=100, kind="text", say=QUIET)
    assert broken["sabotage"] == ["weak-noise"]
    _, sound = run_audit(audit_cfg(tmp_path, DENSE), "ULS", canaries=100, kind="text", say=QUIET)
    for r in (broken, sound):
        assert set(r["scores"]) == {"final-model"} and r["exposure"]["references"] == 2000
        assert 0 <= r["exposure"]["held_out_mean"] <= r["exposure"]["max_possible"]
        assert r["one_shot"] == {}  # the one-shot estimate is for gradient canaries
    assert sound["verdict"] == "consistent"
    assert broken["exposure"]["included_mean"] > broken["exposure"]["held_out_mean"] + 0.5


def test_els_text_canaries_train_through_the_per_example_clip(tmp_path):
    _, r = run_audit(audit_cfg(tmp_path, DENSE), "ELS", canaries=60, kind="text", say=QUIET)
    assert r["verdict"] == "consistent" and r["canaries"]["examples_per_canary"] == 2
    assert len(r["scores"]["final-model"]) == 60 and r["exposure"]["included_mean"] is not None
    rows = [json.loads(line) for line in (Path(r["run_dir"]) / "diagnostics.jsonl").read_text().splitlines()[1:]]
    assert sum(row.get("canary_examples", 0) for row in rows) > 0
    assert all(row["batch"] <= 40 for row in rows if "batch" in row)  # 20 users x k=2 real kept examples


def test_the_python_api_returns_audit_json(tmp_path):
    import fedsim

    result = fedsim.audit(str(ROOT / "configs" / "smoke.yaml"), method="els", canaries=100,
                          overrides=[f"run.output_dir={tmp_path}", "dp.epsilon=1", "dp.delta=1e-6",
                                     "dp.reproducible=false", *DENSE],
                          say=QUIET)
    on_disk = json.loads((Path(result["run_dir"]) / "audit.json").read_text())
    assert on_disk["verdict"] == result["verdict"] == "consistent" and on_disk["method"] == "ELS"


def test_inclusion_coins_are_secret_and_fair():
    from fedsim.auditing.canaries import Canaries
    from fedsim.privacy.randomness import SecretRandomness

    c = Canaries(num_real=5, count=20000, kind="gradient", norm=10.0, seed=0, examples=2)
    a, b = c.inclusion(SecretRandomness.secure()), c.inclusion(SecretRandomness.secure())
    assert abs(a.mean() - 0.5) < 0.02 and (a != b).mean() > 0.45  # fresh per key
    assert np.array_equal(c.inclusion(SecretRandomness.from_seed(3)), c.inclusion(SecretRandomness.from_seed(3)))
    d = c.directions(64, 0, 3)
    assert torch_allclose(d.norm(dim=1), 1.0) and torch_allclose(c.direction(1, 64), d[1])
    assert c.text(0) != c.text(1) and c.text(0).startswith("my secret code is ")


def torch_allclose(x, value) -> bool:
    import torch

    return bool(torch.allclose(x, torch.as_tensor(value, dtype=x.dtype).expand_as(x), atol=1e-6))


def mean_cfg(tmp_path, *extra):
    return load_config(ROOT / "configs" / "mean_estimation.yaml", [
        f"run.output_dir={tmp_path}", "dp.epsilon=1", "data.num_users=200", "run.rounds=20", "els.k=4",
        "els.expected_batch=20", "els.steps=40", "uls.expected_cohort=20", *extra])


@pytest.mark.parametrize("method", ["ULS", "ELS"])
def test_the_mean_estimation_task_is_audited_through_the_same_loop(tmp_path, method):
    _, sound = run_audit(mean_cfg(tmp_path, "dp.reproducible=false"), method, canaries=400, say=QUIET,
                         task="mean-estimation")
    assert sound["verdict"] == "consistent" and sound["task"] == "mean-estimation"
    d = sound["diagnostics"]
    assert d["eval_loss_after"] < d["eval_loss_before"] == 0.5  # it learns the mean (w starts at 0)
    with sabotage.sabotaged("weak-noise"):  # reproducible (deterministic), the auditor blind to the key
        _, broken = run_audit(mean_cfg(tmp_path, "mean_estimation.dim=256", "dp.reproducible=true"), method,
                              canaries=400, say=QUIET, task="mean-estimation", auditor_knows_sampling=False)
    assert broken["verdict"] == "VIOLATION", broken["lower_bound"]


def test_mean_estimation_runs_record_the_plan_and_refuse_text_canaries(tmp_path):
    from fedsim.errors import ConfigError
    from fedsim.mean_estimation_run import run_mean_estimation
    from fedsim.privacy.ledger import PrivacyLedger

    run_dir, summary = run_mean_estimation(mean_cfg(tmp_path), "ELS", QUIET)
    assert summary["steps"] == 40 and len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 40
    assert summary["epsilon"] <= 1.0 and summary["eval_loss_after"] < 0.5
    with pytest.raises(ConfigError, match="gradient canaries only"):
        run_audit(mean_cfg(tmp_path), "ULS", canaries=10, kind="text", say=QUIET, task="mean-estimation")


def test_an_els_audit_keeps_the_configured_steps_and_sampling_rate(tmp_path):
    from fedsim.loop import prepare

    # steps from the matched compute, the default delta (a function of the population size)
    cfg = audit_cfg(tmp_path, ["els.expected_batch=20", "run.rounds=30"], "els.steps=null", "dp.delta=null")
    _, _, plain = prepare(cfg, "ELS", QUIET)
    _, result = run_audit(cfg, "ELS", canaries=100, say=QUIET)
    assert result["steps"] == plain.steps > 1 and result["q"] == pytest.approx(plain.q, rel=1e-12)
    assert result["delta"] == plain.delta and result["noise"] == plain.mechanism.noise_label()


def test_a_sabotaged_mechanism_never_runs_outside_an_audit(tmp_path):
    from fedsim.errors import FedsimError
    from fedsim.loop import run

    with sabotage.sabotaged("weak-noise"), pytest.raises(FedsimError, match="self-test only"):
        run(audit_cfg(tmp_path, DENSE), "ULS", QUIET)
    assert not list(Path(tmp_path).iterdir())


def test_too_few_canaries_on_one_side_still_write_audit_json(tmp_path):
    _, result = run_audit(audit_cfg(tmp_path, DENSE), "ULS", canaries=2, say=QUIET, auditor_knows_sampling=False)
    assert result["verdict"] == "consistent" and (Path(result["run_dir"]) / "audit.json").is_file()
