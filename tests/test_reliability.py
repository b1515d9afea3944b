"""Crash safety: atomic checkpoints, kill-and-resume equality, the ledger survives a crash
after noise; injected client faults are dropped and counted while privacy holds."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fedsim.config import load_config
from fedsim.rundir import read_diagnostics, read_metrics
from fedsim.errors import FedsimError
from fedsim.privacy import PrivacyLedger
from fedsim.privacy.accounting import epsilon, make_accountant
from fedsim.loop import resume, run_uls

ROUNDS = 6


def _cfg(out, *extra):
    return load_config("configs/smoke.yaml", [f"run.output_dir={out}", f"run.rounds={ROUNDS}", "run.checkpoint_every=1",
                                              "run.eval_every=3", *extra])


@pytest.mark.parametrize("extra", [
    [],
    # LoRA dropout draws from torch's global RNG: clients seed it per (seed, round, user)
    ["model.lora.enabled=true", "model.lora.dropout=0.3"],
])
def test_sigkill_after_noise_then_resume_is_bit_identical(tmp_path, extra):
    # uninterrupted reference run
    ref_dir, ref = run_uls(_cfg(tmp_path / "ref", *extra), say=lambda *_: None)
    # the same run, SIGKILLed right after round 4's release is recorded (before its checkpoint)
    crash_out = tmp_path / "crash"
    overrides = [f"run.output_dir={crash_out}", f"run.rounds={ROUNDS}", "run.checkpoint_every=1", "run.eval_every=3",
                 "simulation.faults.server_crash_round=4", *extra]
    code = ("import sys; sys.path.insert(0, '.');"
            "from fedsim.config import load_config; from fedsim.loop import run_uls;"
            f"run_uls(load_config('configs/smoke.yaml', {overrides!r}), say=lambda *_: None)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    run_dir = crash_out / "smoke"
    assert json.loads((run_dir / "checkpoint.json").read_text())["step"] == 3
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 4  # round 4's release was counted
    # resume: same weights bit for bit, same epsilon (the replayed round 4 is the identical release)
    _, res = resume(run_dir, say=lambda *_: None)
    a = load_file(str(ref_dir / "final_weights.safetensors"))
    b = load_file(str(run_dir / "final_weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert res["epsilon"] == ref["epsilon"] and res["steps"] == ROUNDS
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert len(ledger) == ROUNDS
    assert epsilon(make_accountant("pld"), ledger.total_event(), res["delta"]) == pytest.approx(res["epsilon"])
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS + 1))  # the crashed timeline's rows were moved aside, not duplicated


def _crash_after_release_of_last_round(run_dir):
    """Roll the checkpoint back one round: as if the process died after the last release was recorded."""
    from fedsim.checkpoint import load_checkpoint, save_checkpoint

    (run_dir / "summary.json").unlink()
    c = load_checkpoint(run_dir)
    save_checkpoint(run_dir, step=c["step"] - 1, weights=c["weights"], optimizer_state=c["optimizer_state"])


def _assert_no_secret_state(run_dir):
    """A checkpoint holds weights, optimizer and public RNG states only: no sampler or noise state."""
    ptr = json.loads((run_dir / "checkpoint.json").read_text())
    assert not any("sampler" in k or "noise" in k for k in ptr)
    tensors = load_file(str(run_dir / ptr["tensors"]))
    assert all(k == "weights" or k.startswith("opt.") or k == "rng.torch" for k in tensors)


@pytest.mark.parametrize("budget,expect_releases,expect_rounds", [(50.0, 4, 3), (None, 3, 2)])
def test_secure_mode_resume_counts_a_redone_round_twice_or_stops(tmp_path, budget, expect_releases, expect_rounds):
    extra = ["dp.reproducible=false", "run.rounds=3"]
    extra += ["dp.noise_multiplier=1.0", "dp.epsilon=50"] if budget else ["dp.epsilon=20"]
    run_dir, _ = run_uls(_cfg(tmp_path, *extra), say=lambda *_: None)
    _assert_no_secret_state(run_dir)  # the secret never hits disk
    _crash_after_release_of_last_round(run_dir)
    _, res = resume(run_dir, say=lambda *_: None)
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    # fresh noise for the re-done round: a new release, counted again -- or refused if it does not fit
    assert len(ledger) == expect_releases and res["steps"] == expect_rounds
    assert res["epsilon"] <= res["target_epsilon"]
    if budget is None:
        assert "budget" in res["stop_reason"]


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    run_dir, _ = run_uls(_cfg(tmp_path, "run.rounds=2"), say=lambda *_: None)
    (run_dir / "summary.json").unlink()
    tensors = next(run_dir.glob("checkpoint-r*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(FedsimError, match="corrupt checkpoint"):
        resume(run_dir, say=lambda *_: None)
    (run_dir / "checkpoint.json").unlink()
    with pytest.raises(FedsimError, match="no checkpoint"):
        resume(run_dir, say=lambda *_: None)
    with pytest.raises(FedsimError, match="not a fedsim run directory"):
        resume(tmp_path / "nothing-here", say=lambda *_: None)


def test_injected_client_faults_are_dropped_counted_and_still_noised(tmp_path):
    cfg = _cfg(tmp_path, "run.rounds=4", "run.checkpoint_every=0", "uls.expected_cohort=10",
               "simulation.faults.raise_rate=0.2", "simulation.faults.nan_rate=0.2", "simulation.faults.shape_rate=0.1")
    run_dir, s = run_uls(cfg, say=lambda *_: None)
    rows = read_diagnostics(run_dir)[1:]
    dropped = sum(r["dropped_replies"] for r in rows)
    assert dropped > 0
    assert all(r["users"] + r["dropped_replies"] == r["cohort"] for r in rows)  # one user per message
    assert all(m["update_norm"] > 0 and m["noise_std"] > 0 for m in read_metrics(run_dir)[1:])  # noise is added whatever arrived
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 4
    import math

    assert math.isfinite(s["eval_loss_after"])


def test_a_client_slower_than_the_timeout_is_dropped_counted_and_still_noised(tmp_path):
    """simulation.faults.hang_rate: the client sleeps past simulation.timeout; its reply is not
    returned, the round is aggregated without it (noise added, denominator unchanged) and the
    lost message is counted as missing and dropped."""
    from clients.client_app import inject_fault
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.sampling import PoissonSampler

    rounds = 3
    cfg = _cfg(tmp_path, f"run.rounds={rounds}", "run.checkpoint_every=0", "uls.expected_cohort=6",
               "simulation.faults.hang_rate=0.15", "simulation.faults.seed=1",  # one hang per round
               "simulation.faults.hang_seconds=2", "simulation.timeout=1")
    run_dir, s = run_uls(cfg, say=lambda *_: None)
    rows = read_diagnostics(run_dir)[1:]
    sampler = PoissonSampler(s["num_users"], s["q"], SecretRandomness.from_seed(cfg.run.seed), "uls-cohort")
    hangs = [sum(inject_fault(cfg.simulation.faults, rnd, int(u)) == "hang" for u in sampler.sample(rnd))
             for rnd in range(1, rounds + 1)]
    assert sum(hangs) >= 2  # with this fault seed, hangs happen in most rounds
    assert [r["missing_replies"] for r in rows] == hangs
    assert [r["dropped_replies"] for r in rows] == hangs
    assert all(r["users"] + r["dropped_replies"] == r["cohort"] for r in rows)
    assert all(m["update_norm"] > 0 and m["noise_std"] > 0 for m in read_metrics(run_dir)[1:])
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == rounds
    assert epsilon(make_accountant("pld"), PrivacyLedger(run_dir / "privacy_ledger.jsonl").total_event(),
                                          s["delta"]) == pytest.approx(s["epsilon"])


def test_fault_rates_adding_up_to_more_than_one_are_refused():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="add up to 1.2"):
        load_config("configs/smoke.yaml", ["simulation.faults.raise_rate=0.6", "simulation.faults.hang_rate=0.6"])


@pytest.mark.slow
def test_soak_200_rounds_with_dropped_and_nan_clients(tmp_path):
    import math

    import torch

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "run.rounds=200", "run.eval_every=50",
                                              "run.checkpoint_every=25", "simulation.faults.raise_rate=0.1",
                                              "simulation.faults.nan_rate=0.05"])
    run_dir, s = run_uls(cfg, say=lambda *_: None)
    assert s["steps"] == 200
    w = load_file(str(run_dir / "final_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())
    rows = read_diagnostics(run_dir)[1:]
    assert sum(r["dropped_replies"] for r in rows) > 0.1 * sum(r["cohort"] for r in rows)
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert len(ledger) == 200
    assert epsilon(make_accountant("pld"), ledger.total_event(), s["delta"]) == pytest.approx(s["epsilon"])
    assert s["epsilon"] <= 8.0 and math.isfinite(s["eval_loss_after"])


# -- ELS: the same guarantees for the centralized baseline ------------------------------------
ELS_STEPS = 6


def _els_overrides(out, *extra):
    return [f"run.output_dir={out}", f"els.steps={ELS_STEPS}", "els.expected_batch=8", "els.k=2", "els.eval_every=3",
            "run.checkpoint_every=1", *extra]


def _crash_els(out, step, *extra):
    """Run ELS in a subprocess that SIGKILLs itself right after step `step`'s release is recorded."""
    overrides = _els_overrides(out, f"simulation.faults.server_crash_round={step}", *extra)
    code = ("import sys; sys.path.insert(0, '.');"
            "from fedsim.config import load_config; from fedsim.loop import run_els;"
            f"run_els(load_config('configs/smoke.yaml', {overrides!r}), say=lambda *_: None)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    return out / "smoke"


@pytest.mark.parametrize("extra", [
    [],
    # LoRA dropout draws from torch's global RNG in train mode: the checkpoint must restore it too
    ["model.lora.enabled=true", "model.lora.dropout=0.3", "els.accounting_interval=0.1"],
], ids=["full", "lora-dropout"])
def test_els_sigkill_after_noise_then_resume_is_bit_identical(tmp_path, capsys, extra):
    from fedsim.account import check_run_dir
    from fedsim.cli import main
    from fedsim.loop import run_els

    ref_dir, ref = run_els(load_config("configs/smoke.yaml", _els_overrides(tmp_path / "ref", *extra)), say=lambda *_: None)
    run_dir = _crash_els(tmp_path / "crash", 4, *extra)
    assert json.loads((run_dir / "checkpoint.json").read_text())["step"] == 3
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 4  # step 4's release was counted
    # `fedsim run --resume` recognises an ELS checkpoint
    assert main(["run", "--resume", str(run_dir)]) == 0
    res = json.loads((run_dir / "summary.json").read_text())
    a = load_file(str(ref_dir / "final_weights.safetensors"))
    b = load_file(str(run_dir / "final_weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert res["epsilon"] == ref["epsilon"] and res["steps"] == ELS_STEPS
    assert res["eval_loss_after"] == ref["eval_loss_after"] and res["compute_examples"] == ref["compute_examples"]
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == ELS_STEPS  # the replay was the identical release
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(ELS_STEPS + 1))
    assert check_run_dir(str(run_dir))["match"]
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 2  # finished: nothing to resume, a one-line error
    assert "already finished" in capsys.readouterr().err


def test_els_secure_mode_resume_counts_the_redone_step_again(tmp_path):
    from fedsim.loop import resume

    run_dir = _crash_els(tmp_path, 4, "dp.reproducible=false", "dp.epsilon=30")
    _assert_no_secret_state(run_dir)
    _, res = resume(run_dir, say=lambda *_: None)
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    # step 4 gets fresh noise: a second release, counted again (or refused by the budget guard)
    assert len(ledger) == res["steps"] + 1 and [e["step"] for e in ledger.entries].count(4) == 2
    assert res["epsilon"] <= 30 and res["epsilon"] == pytest.approx(
        epsilon(make_accountant(res["accountant"], **res["accountant_options"]), ledger.total_event(), res["delta"]))


# -- security: a config cannot make fedsim import code; nothing is ever unpickled ------------------
def test_package_model_path_locates_a_package_without_importing_it(tmp_path, monkeypatch):
    from fedsim.errors import ModelError
    from fedsim.models.causal_lm import resolve_model_path

    pkg = tmp_path / "fedsim_evil_pkg"
    (pkg / "sub").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (pkg / "sub" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("package:fedsim_evil_pkg") == pkg  # located: its directory, as data
    assert not marker.exists() and "fedsim_evil_pkg" not in sys.modules  # never imported
    # a dotted name would import the parent package to find the child: refused; so are modules and junk
    for bad in ("package:fedsim_evil_pkg.sub", "package:os", "package:no_such_pkg_xyz", "package:../etc", "package:"):
        with pytest.raises(ModelError, match="not installed"):
            resolve_model_path(bad)
    assert not marker.exists() and "fedsim_evil_pkg" not in sys.modules


def test_no_code_path_unpickles_or_runs_remote_code():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [f for d in ("fedsim", "server", "clients", "strategies", "bench") for f in (root / d).rglob("*.py")]
    assert len(files) > 20
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|joblib|marshal)\b|pickle\.loads?\(|yaml\.load\("
                        r"|yaml\.unsafe_load|allow_pickle\s*=\s*True|read_pickle|trust_remote_code\s*=\s*True"
                        r"|(?<![.\w])eval\(|(?<![.\w])exec\(|__import__\(", re.M)  # not model.eval()
    offenders = [f"{f.relative_to(root)}: {m.group(0).strip()}" for f in files for m in unsafe.finditer(f.read_text())]
    offenders += [f"{f.relative_to(root)}: {m.group(0)}" for f in files
                  for m in re.finditer(r"torch\.load\([^)]*\)", f.read_text()) if "weights_only=True" not in m.group(0)]
    assert offenders == []


def test_a_compare_directorys_els_run_resumes_with_fedsim_run(tmp_path):
    """`fedsim compare` writes els/config.yaml with the planned steps; `fedsim run --resume
    runs/compare/els` rebuilds the same plan (steps, sigma, eval cadence) and finishes it."""
    import shutil

    from fedsim.comparison import run_compare
    from fedsim.cli import main

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "els.k=4", "els.accounting_interval=0.1",
                                              "els.expected_batch=8", "run.checkpoint_every=1"])
    out, result = run_compare(cfg, say=lambda *_: None)
    els = out / "els"
    ref = tmp_path / "ref"
    shutil.copytree(els, ref)
    (els / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary
    (els / "final_weights.safetensors").unlink()
    assert main(["run", "--resume", str(els)]) == 0
    a = load_file(str(ref / "final_weights.safetensors"))
    b = load_file(str(els / "final_weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    s, r = json.loads((els / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert (s["steps"], s["epsilon"], s["noise_multiplier"], s["eval_loss_after"]) == \
           (r["steps"], r["epsilon"], r["noise_multiplier"], r["eval_loss_after"])
    assert len(PrivacyLedger(els / "privacy_ledger.jsonl")) == s["steps"] == result["els"]["steps"]


def test_compare_killed_in_uls_then_in_els_resumes_to_the_uninterrupted_result(tmp_path):
    """`fedsim compare --resume DIR`: a comparison SIGKILLed after a ULS round's release, and
    again (on the first resume) after an ELS step's release, ends with the same weights,
    epsilons and eval losses as an uninterrupted comparison (reproducible mode), and each
    ledger holds each release once."""
    from fedsim.cli import main

    overrides = ["els.k=2", "els.expected_batch=8", "run.checkpoint_every=1",
                 "els.accounting_interval=0.1",  # quick calibrations
                 "compare.methods=[uls,els]"]  # the crash fault would stop a fresh reference run as well
    ref_out, ref = __import__("fedsim.comparison", fromlist=["run_compare"]).run_compare(
        load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path / 'ref'}", *overrides]), say=lambda *_: None)
    crash = [f"run.output_dir={tmp_path / 'crash'}", *overrides, "simulation.faults.server_crash_round=2"]
    code = ("import sys; sys.path.insert(0, '.'); from fedsim.cli import main;"
            f"main(['compare', 'configs/smoke.yaml'] + [a for o in {crash!r} for a in ('--set', o)])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]  # killed in ULS round 2
    out = next((tmp_path / "crash").iterdir())
    assert (out / "uls").is_dir() and not (out / "els").exists()
    p = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from fedsim.cli import main;"
                        f"main(['compare', '--resume', {str(out)!r}])"], capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]  # ULS finished; the fresh ELS run was killed at step 2
    assert (out / "uls" / "summary.json").is_file() and not (out / "els" / "summary.json").exists()
    assert main(["compare", "--resume", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    for m in ("uls", "els"):
        a = load_file(str(ref_out / m / "final_weights.safetensors"))
        b = load_file(str(out / m / "final_weights.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), m
        assert (res[m]["epsilon"], res[m]["eval_loss_after"]) == (ref[m]["epsilon"], ref[m]["eval_loss_after"])
    assert len(PrivacyLedger(out / "uls" / "privacy_ledger.jsonl")) == res["uls"]["steps"]
    assert len(PrivacyLedger(out / "els" / "privacy_ledger.jsonl")) == res["els"]["steps"]
    assert main(["compare", "--resume", str(out)]) == 2  # finished: nothing to resume, a clear error
