"""ULS in-process: strategy aggregation, noise scale, faults, and tiny end-to-end runs."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedsim.config import load_config
from fedsim.privacy import GaussianMechanism, PrivacyLedger
from fedsim.privacy.accounting import compute_epsilon, make_accountant
from fedsim.privacy.budget import PrivacyBudget
from fedsim.privacy.randomness import SecretRandomness
from fedsim.loop import run_uls
from fedsim.simulate import InProcessGrid
from fedsim.privacy.release import Release
from strategies.uls_strategy import UlsStrategy, assign_users_to_nodes


def make_strategy(d=1000, n=200, q=0.1, clip=1.0, seed=0):
    return UlsStrategy(num_users=n, dimension=d, sampling_rate=q, clip_norm=clip,
                       randomness=SecretRandomness.from_seed(seed))


def make_release(q=0.1, n=200, sigma=1.0, clip=1.0, seed=0):
    mech = GaussianMechanism(clip, sigma)
    ledger = PrivacyLedger()
    budget = PrivacyBudget(lambda: make_accountant("rdp"), 1e-5, None)
    return Release(mechanism=mech, event=mech.sampled_event(q), ledger=ledger, budget=budget,
                   randomness=SecretRandomness.from_seed(seed), purpose="uls", denominator=q * n)


def reply(vec, users=1, to=None):
    rd = RecordDict({"arrays": ArrayRecord({"delta-sum": Array(np.asarray(vec, dtype=np.float32))}),
                     "metrics": MetricRecord({"num-users": users, "num-examples": 4 * users, "loss-sum": 1.0 * users,
                                              "num-clipped": 0, "num-failed": 0})})
    return Message(content=rd, reply_to=to)


@pytest.fixture
def request_msg():
    InProcessGrid.__init__(object.__new__(InProcessGrid), None, 1)  # sets Flower task ids for Message()
    return Message(content=RecordDict({"config": ConfigRecord({"a": 1})}), message_type="train", dst_node_id=1)


def test_noise_std_of_release_is_sigma_c_over_qn():
    # an empty sum: the update is pure noise / (qN), so its per-coordinate std is sigma*C/(qN)
    release = make_release(n=400, q=0.05, sigma=1.2, clip=0.5)
    update, metrics = release.release(1, torch.zeros(50_000))
    assert np.std(update.numpy()) == pytest.approx(1.2 * 0.5 / (0.05 * 400), rel=0.02)
    assert len(release.ledger) == 1 and release.budget.releases == 1  # recorded and counted


def test_aggregate_is_the_sum_of_valid_replies(request_msg):
    s = make_strategy(d=4, n=10, q=0.5)
    vecs = [np.array([0.5, 0, 0, 0]), np.array([0, 0.5, 0, 0]), np.array([0.1, 0.1, 0.1, 0.1])]
    arrays, metrics = s.aggregate_train(1, [reply(v, to=request_msg) for v in vecs])
    np.testing.assert_allclose(arrays["delta-sum"].numpy(), np.sum(vecs, axis=0), rtol=1e-6)
    assert metrics["users"] == 3 and metrics["dropped_replies"] == 0
    # and the release divides by the expected cohort qN = 5, whatever was sampled
    update, _ = make_release(q=0.5, n=10, sigma=0.0).release(1, torch.from_numpy(arrays["delta-sum"].numpy().copy()))
    np.testing.assert_allclose(update.numpy(), np.sum(vecs, axis=0) / 5.0, rtol=1e-6)


def test_bad_replies_are_dropped_and_counted(request_msg):
    s = make_strategy(d=4, n=10, q=0.5, clip=1.0)
    good = reply([0.5, 0, 0, 0], to=request_msg)
    nan = reply([np.nan, 0, 0, 0], to=request_msg)
    shape = reply([0.1, 0.1], to=request_msg)
    unclipped = reply([3.0, 0, 0, 0], users=1, to=request_msg)  # norm 3 > 1 x C
    err = Message(Error(code=1, reason="boom"), reply_to=request_msg)
    arrays, metrics = s.aggregate_train(1, [good, nan, shape, unclipped, err])
    np.testing.assert_allclose(arrays["delta-sum"].numpy(), [0.5, 0, 0, 0], rtol=1e-6)
    assert metrics["dropped_replies"] == 4 and metrics["users"] == 1


def test_assign_users_to_nodes():
    nodes = [11, 22, 33]
    assert assign_users_to_nodes(np.array([0, 2, 4]), nodes, 1) == [(11, 0, [0]), (33, 2, [2]), (22, 4, [4])]
    assert assign_users_to_nodes(np.array([0, 1, 2, 3, 4]), nodes, 2, 3) == [(11, 0, [0, 3]), (22, 1, [1, 4]),
                                                                             (33, 2, [2])]


def test_a_users_message_does_not_depend_on_who_else_was_sampled():
    # with cohort workers, losing one message (a dead node) must remove a set of users fixed by
    # their ids: adding user 0 to the cohort may not move any other user to another message
    nodes = [11, 22, 33]

    def groups(cohort):
        return {u: (node, key) for node, key, us in assign_users_to_nodes(np.array(cohort), nodes, 2, 3) for u in us}

    without, with_0 = groups([1, 2, 3, 4, 5, 6]), groups([0, 1, 2, 3, 4, 5, 6])
    assert all(with_0[u] == without[u] for u in without)


def test_cohort_worker_sum_equals_per_user_path(smoke_cfg):
    """Scale mode: one worker summing clipped deltas == one user per client, summed by the server."""
    from fedsim.workers import get_worker

    worker = get_worker(smoke_cfg)
    w = worker.task.flat.get()
    users = [0, 3, 5, 7]
    together = worker.train_users(users, w, server_round=2)
    separately = sum(worker.train_users([u], w, server_round=2).delta_sum for u in users)
    torch.testing.assert_close(together.delta_sum, separately, rtol=1e-5, atol=1e-6)
    assert together.num_users == 4


def test_tiny_end_to_end_run_writes_metrics_and_finite_epsilon(smoke_cfg):
    run_dir, summary = run_uls(smoke_cfg, say=lambda *_: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert 0 < summary["epsilon"] <= smoke_cfg.dp.epsilon and math.isfinite(summary["epsilon"])
    assert summary["noise_source"] == "reproducible-seed"
    assert (run_dir / "final_weights.safetensors").is_file() and (run_dir / "config.yaml").is_file()
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert len(ledger) == 3
    assert compute_epsilon(ledger.total_event(), summary["delta"], "pld") == pytest.approx(summary["epsilon"])
    others = summary["epsilon_by_accountant"]
    assert others["pld"] == pytest.approx(summary["epsilon"])
    assert others["rdp"] >= others["pld"] and others["prv"] >= others["pld"] * 0.999


def test_non_private_run_lowers_eval_loss(tmp_path):
    from fedsim.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "dp.noise_multiplier=0", "dp.epsilon=null",
                                              "run.rounds=5", "uls.expected_cohort=10"])
    _, summary = run_uls(cfg, say=lambda *_: None)
    assert math.isinf(summary["epsilon"])
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05


def test_budget_stops_a_run_that_would_overspend(tmp_path):
    from fedsim.config import load_config

    # calibrated for 3 rounds, but we ask for 3 and then force more rounds with a fixed sigma
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "run.rounds=3"])
    from fedsim.plan import plan_uls

    sigma = plan_uls(cfg, 20).mechanism.noise_multiplier
    cfg2 = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "run.rounds=6", f"dp.noise_multiplier={sigma}",
                                               "dp.epsilon=null"])
    # with epsilon=null and a fixed sigma the plan's epsilon becomes the target: 6 rounds fit
    _, s = run_uls(cfg2, say=lambda *_: None)
    assert s["steps"] == 6
    # the budget of 3 rounds with the same sigma: refused up front, nothing overspent
    from fedsim.errors import ConfigError

    cfg3 = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "run.rounds=6", f"dp.noise_multiplier={sigma}"])
    with pytest.raises(ConfigError, match="above dp.epsilon"):
        run_uls(cfg3, say=lambda *_: None)


def test_uls_run_with_lmo_noise_uses_the_faithful_accountant(tmp_path):
    from fedsim.config import load_config
    from fedsim.privacy.lmo import LmoParams, faithful_epsilon

    lmo = {"a1": 0.0, "a3": 0.0, "a4": 1.0, "G_k": 1.0, "G_theta": 1.0, "E_lambda": 1.0, "U_a": 0.9, "U_b": 1.0}
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "dp.mechanism=lmo", "dp.epsilon=null",
                                              f"dp.lmo={json.dumps(lmo)}"])
    run_dir, s = run_uls(cfg, say=lambda *_: None)
    assert s["accountant"] == "lmo_faithful" and s["mechanism"]["mechanism"] == "lmo"
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    assert len(ledger) == 3 and ledger.entries[0]["event"]["event"]["type"] == "LmoDpEvent"
    d = s["trainable_weights"]
    expected = faithful_epsilon(LmoParams.from_dict(lmo), q=s["q"], steps=3, delta=s["delta"], dimension=d)
    assert s["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert compute_epsilon(ledger.total_event(), s["delta"], "lmo_faithful") == pytest.approx(s["epsilon"])


def test_a_users_delta_with_dropout_depends_only_on_seed_round_and_user(tmp_path):
    """LoRA dropout draws from torch's global RNG: `train_user` seeds it from (seed, round, user),
    so the delta does not depend on what ran before in the worker (another user, a resume)."""
    import torch

    from fedsim.training.local import train_user, user_generator
    from fedsim.workers import get_worker

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "model.lora.enabled=true", "model.lora.dropout=0.5"])
    worker = get_worker(cfg)
    w0 = worker.task.flat.get().clone()
    ex = worker.store.train_examples(3)

    def delta(global_rng_seed):
        torch.manual_seed(global_rng_seed)  # whatever state an earlier user or process left behind
        return train_user(worker.task, w0, ex, cfg.uls, user_generator(cfg.run.seed, 2, 3)).delta

    a, b = delta(0), delta(12345)
    assert torch.equal(a, b)
    other = train_user(worker.task, w0, ex, cfg.uls, user_generator(cfg.run.seed, 3, 3)).delta
    assert not torch.equal(a, other)  # another round: other batches and other dropout masks
