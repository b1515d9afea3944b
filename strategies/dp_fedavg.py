"""DP-FedAvg with user-level sampling (ULS) as a Flower message-API strategy.

One round (DESIGN.md, "One ULS round"):
1. `configure_train`: the budget guard checks that one more release fits; a Poisson(q)
   cohort of users is drawn; its users are sent, with the current trainable weights,
   to Flower nodes (one user per node, or lists of users to cohort workers).
2. Clients reply with the *sum of individually clipped deltas* and a user count.
3. `aggregate_train`: replies that failed, are non-finite, mis-shaped or exceed the
   norm their count allows are dropped (counted in metrics); the release is written to
   the ledger *before* noise is drawn; noise from the mechanism is added to the sum;
   the result is divided by the *expected* cohort size qN (a fixed denominator keeps the
   sensitivity C/(qN)); the server optimizer steps.

What the server sees: clipped per-user deltas (central DP, trusted server).
"""

from __future__ import annotations

import logging
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
from fedsim.sampling import PoissonUserSampler
from fedsim.training.server_opt import ServerOptimizer

log = logging.getLogger("fedsim")


def assign_users_to_nodes(cohort: np.ndarray, node_ids: list[int], users_per_client: int) -> list[tuple[int, list[int]]]:
    """Split the cohort into groups of at most `users_per_client` users, round-robin over nodes.

    With one user per client and one node per user (num nodes == num users) user u goes to
    the u-th node, so a user is always served by the same Flower node.
    """
    if len(node_ids) == 0:
        raise RuntimeError("no Flower nodes are connected")
    users = [int(u) for u in cohort]
    if users_per_client == 1:
        return [(node_ids[u % len(node_ids)], [u]) for u in users]
    groups = [users[i : i + users_per_client] for i in range(0, len(users), users_per_client)]
    return [(node_ids[i % len(node_ids)], g) for i, g in enumerate(groups)]


class DPFedAvg(Strategy):
    def __init__(
        self,
        *,
        num_users: int,
        sampling_rate: float,
        mechanism: NoiseMechanism,
        server_optimizer: ServerOptimizer,
        budget: PrivacyBudget,
        sampler: PoissonUserSampler,
        noise_generator: torch.Generator,
        users_per_client: int = 1,
        replay_identical: bool = False,
        crash_after_record_round: int | None = None,
    ):
        if not 0 < sampling_rate <= 1:
            raise ValueError("The sampling rate should be in (0, 1].")
        self.num_users, self.q = num_users, sampling_rate
        self.expected_cohort = sampling_rate * num_users
        self.mechanism, self.server_opt, self.budget = mechanism, server_optimizer, budget
        self.sampler, self.noise_gen = sampler, noise_generator
        self.users_per_client = users_per_client
        self.replay_identical = replay_identical  # reproducible resume: re-done rounds are identical releases
        self.crash_round = crash_after_record_round  # fault injection: the worst moment to die
        self.round_event = dp_event.PoissonSampledDpEvent(sampling_rate, mechanism.dp_event())
        self._round: dict = {}

    def summary(self) -> None:
        log.info("DPFedAvg (ULS): users=%d q=%.5g expected cohort=%.1f mechanism=%s users/client=%d",
                 self.num_users, self.q, self.expected_cohort, self.mechanism.describe(), self.users_per_client)

    # -- training ------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.replay_identical and self.budget.ledger.has(server_round, self.round_event):
            eps_after = self.budget.spent()  # re-doing an identical, already counted release
        else:
            eps_after = self.budget.check(self.round_event)  # raises BudgetExceededError: never overspend
        cohort = self.sampler.sample()
        node_ids = sorted(grid.get_node_ids())
        groups = assign_users_to_nodes(cohort, node_ids, self.users_per_client)
        self._round = {"round": server_round, "cohort": len(cohort), "eps_after": eps_after, "t0": time.time(),
                       "messages": len(groups)}
        messages = []
        for node_id, users in groups:
            cfg = ConfigRecord({**dict(config), "server-round": server_round, "user-ids": users})
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
        loss_sum, dropped = 0.0, 0
        replies = list(replies)
        # a message with no reply timed out (or its node vanished): dropped like a failed one
        missing = max(0, self._round.get("messages", len(replies)) - len(replies))
        if missing:
            log.warning("round %d: %d message(s) got no reply before the timeout", server_round, missing)
        dropped += missing
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
        # record the release before the noise exists: a crash after this line is counted
        self.budget.ledger.record(server_round, self.round_event, replay_identical=self.replay_identical,
                                  cohort=self._round.get("cohort", users))
        if self.crash_round == server_round:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        noisy, noise_metrics = self.mechanism.add_noise(total, self.noise_gen)
        avg = noisy / self.expected_cohort
        new = self.server_opt.step(avg)
        metrics = {
            "round": server_round, "cohort": self._round.get("cohort", users), "users": users,
            "examples": examples, "train_loss": loss_sum / max(users, 1), "clipped_frac": clipped / max(users, 1),
            "dropped_replies": dropped, "missing_replies": missing, "failed_users": failed_users, "messages": self._round.get("messages", 0),
            "epsilon": self._round.get("eps_after", float("nan")),
            "update_norm": float(torch.linalg.vector_norm(avg)), **noise_metrics,
        }
        return ArrayRecord({"w": Array(new.numpy().astype(np.float32))}), MetricRecord(metrics)

    # -- evaluation happens centrally on the server (evaluate_fn); no federated eval --
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
