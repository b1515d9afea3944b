"""DP-FedAvg with user-level sampling (ULS) as a Flower message-API strategy.

One round (docs/architecture.md, "One ULS round"):
1. `configure_train`: the budget guard checks that one more release fits; a Poisson(q)
   cohort of users is drawn from the secret randomness source
   (`fedsim/privacy/randomness.py`); its users are sent, with the current trainable weights,
   to Flower nodes (one user per node, or lists of users to cohort workers).
2. Clients reply with the *sum of individually clipped deltas* and a user count.
3. `aggregate_train`: replies that failed, are non-finite, mis-shaped or exceed the
   norm their count allows are dropped (counted in metrics); the release is written to
   the ledger *before* noise is drawn; noise from the mechanism (secret keystream) is added
   to the sum;
   the result is divided by the *expected* cohort size qN (a fixed denominator keeps the
   sensitivity C/(qN)); the server optimizer steps.

What the server sees: clipped per-user deltas (central DP, trusted server).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import numpy as np
import torch
from dp_accounting import dp_event
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.privacy.budget import PrivacyBudget
from fedsim.privacy.mechanisms import NoiseMechanism
from fedsim.privacy.randomness import SecretRandomness
from fedsim.privacy.release import Release, kill_after_recording
from fedsim.sampling import PoissonSampler
from fedsim.training.server_opt import ServerOptimizer

log = logging.getLogger("fedsim")


def assign_users_to_nodes(cohort: np.ndarray, node_ids: list[int], users_per_client: int,
                          num_buckets: int | None = None) -> list[tuple[int, int, list[int]]]:
    """(node id, message key, users) of each message of a round.

    One user per message (`users_per_client == 1`): user u goes to node u mod #nodes, keyed u.
    Cohort workers: user u belongs to bucket u mod B, whatever else was sampled, one message
    per non-empty bucket (B = `num_buckets`, about expected cohort / users_per_client; a
    bucket holds Binomial-many users around users_per_client), bucket b to node b mod #nodes.
    A user's message never depends on who else was sampled, so a lost message (a dead
    worker, a timeout) removes a set of users fixed by their ids: between neighbouring
    datasets the summed sets differ by one user at most, and the sensitivity stays C. (Slicing
    the sorted cohort, the old way, shifted every later user when one more was sampled.)
    """
    if len(node_ids) == 0:
        raise RuntimeError("no Flower nodes are connected")
    users = [int(u) for u in cohort]
    if users_per_client == 1:
        return [(node_ids[u % len(node_ids)], u, [u]) for u in users]
    buckets = max(1, int(num_buckets or 1))
    groups: dict[int, list[int]] = {}
    for u in users:
        groups.setdefault(u % buckets, []).append(u)
    return [(node_ids[b % len(node_ids)], b, g) for b, g in sorted(groups.items())]


class DPFedAvg(Strategy):
    def __init__(
        self,
        *,
        num_users: int,
        sampling_rate: float,
        mechanism: NoiseMechanism,
        server_optimizer: ServerOptimizer,
        budget: PrivacyBudget,
        randomness: SecretRandomness,
        users_per_client: int = 1,
        expected_cohort: float | None = None,
        replay_identical: bool = False,
        crash_after_record_round: int | None = None,
    ):
        if not 0 < sampling_rate <= 1:
            raise ValueError("The sampling rate should be in (0, 1].")
        self.num_users, self.q = num_users, sampling_rate
        # the public denominator: uls.expected_cohort (= qN unless q is set directly)
        self.expected_cohort = expected_cohort if expected_cohort is not None else sampling_rate * num_users
        self.mechanism, self.server_opt, self.budget = mechanism, server_optimizer, budget
        # the cohort and (in `self.release`) the noise: both from the one secret source
        self.sampler = PoissonSampler(num_users, sampling_rate, randomness, "uls-cohort")
        self.users_per_client = users_per_client
        self.round_event = dp_event.PoissonSampledDpEvent(sampling_rate, mechanism.dp_event())
        # guard -> record -> noise -> scale (fedsim/privacy/release.py); `replay_identical`: this
        # run was resumed (a re-done round is an identical release only in reproducible mode)
        self.release = Release(mechanism=mechanism, event=self.round_event, budget=budget, randomness=randomness,
                               purpose="uls", denominator=self.expected_cohort, resumed=replay_identical,
                               after_record=kill_after_recording(crash_after_record_round))
        self._round: dict = {}

    def summary(self) -> None:
        log.info("DPFedAvg (ULS): users=%d q=%.5g expected cohort=%.1f mechanism=%s users/client=%d",
                 self.num_users, self.q, self.expected_cohort, self.mechanism.describe(), self.users_per_client)

    # -- training ------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        eps_after = self.release.guard(server_round)  # raises BudgetExceededError: never overspend
        cohort = self.sampler.sample(server_round)
        node_ids = sorted(grid.get_node_ids())
        buckets = math.ceil(self.expected_cohort / self.users_per_client)
        groups = assign_users_to_nodes(cohort, node_ids, self.users_per_client, buckets)
        self._round = {"round": server_round, "cohort": len(cohort), "eps_after": eps_after, "t0": time.time(),
                       "messages": len(groups)}
        messages = []
        for node_id, key, users in groups:
            cfg = ConfigRecord({**dict(config), "server-round": server_round, "user-ids": users, "message-key": key})
            messages.append(Message(content=RecordDict({"arrays": arrays, "config": cfg}),
                                    message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def _reply_sum(self, msg: Message, d: int) -> tuple[torch.Tensor | None, dict, str]:
        """(delta sum, metrics, reason) of one reply; delta sum None when the reply is dropped."""
        if msg.has_error():
            return None, {}, f"error: {msg.error.reason}"
        try:
            arr = msg.content["arrays"]["delta-sum"].numpy()
            met = dict(msg.content["metrics"])
        except Exception as exc:  # malformed reply
            return None, {}, f"malformed reply: {exc}"
        if arr.shape != (d,):
            return None, met, f"wrong shape {arr.shape}, expected ({d},)"
        vec = torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())
        if not torch.isfinite(vec).all():
            return None, met, "non-finite values"
        n = int(met.get("num-users", 0))
        # a sum of n clipped deltas has norm <= n*C: anything larger was not clipped
        if float(vec.double().pow(2).sum().sqrt()) > n * self.mechanism.clip_norm * (1 + 1e-4) + 1e-6:  # float64: f32 norms read low
            return None, met, f"norm exceeds {n} x clip norm"
        return vec, met, ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        weights = self.server_opt.weights
        d = weights.numel()
        total = torch.zeros(d, dtype=torch.float32)
        users = examples = clipped = failed_users = 0
        replies = list(replies)
        # a message with no reply timed out (or its node vanished): dropped like a failed one
        missing = max(0, self._round.get("messages", len(replies)) - len(replies))
        if missing:
            log.warning("round %d: %d message(s) got no reply before the timeout", server_round, missing)
        loss_sum, dropped = 0.0, missing
        for msg in replies:
            vec, met, why = self._reply_sum(msg, d)
            if vec is None:
                dropped += 1
                log.warning("round %d: dropped a reply (%s)", server_round, why)
                continue
            total.add_(vec)
            users += int(met.get("num-users", 0))
            examples += int(met.get("num-examples", 0))
            loss_sum += float(met.get("loss-sum", 0.0))
            clipped += int(met.get("num-clipped", 0))
            failed_users += int(met.get("num-failed", 0))
        signal_norm = float(torch.linalg.vector_norm(total))  # a diagnostic: the unnoised sum
        # record (before the noise exists), noise, divide by the expected cohort; then the server step
        avg, noise_metrics = self.release.release(server_round, total)
        new = self.server_opt.step(avg)
        metrics = {
            # released (covered by the guarantee): public plan values and the noisy update
            "round": server_round, "epsilon": self._round.get("eps_after", float("nan")), "q": self.q,
            "expected_cohort": self.expected_cohort, "update_norm": float(torch.linalg.vector_norm(avg)),
            **noise_metrics,
            # simulation diagnostics (computed from unnoised user data; diagnostics.jsonl)
            "cohort": self._round.get("cohort", users), "users": users, "examples": examples,
            "train_loss": loss_sum / max(users, 1), "clipped_frac": clipped / max(users, 1),
            "dropped_replies": dropped, "missing_replies": missing, "failed_users": failed_users,
            "messages": self._round.get("messages", 0), "signal_norm": signal_norm,
        }
        return ArrayRecord({"w": Array(new.numpy().astype(np.float32))}), MetricRecord(metrics)

    # -- evaluation happens centrally on the server (evaluate_fn); no federated eval --
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
