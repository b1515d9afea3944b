"""ULS (user-level sampling, the clipped-sum side of DP-FedAvg) as a Flower message-API strategy:
the training loop's method adaptor for ULS (`fedsim/loop.py`).

One round's clipped sum (docs/architecture.md, "One ULS round"):
1. `configure_train`: a Poisson(q) cohort of users is drawn from the secret randomness source
   (`fedsim/privacy/randomness.py`) -- or, when the mechanism asks for participation groups
   (banded MF), a cyclic Poisson cohort of the round's group (`fedsim/sampling.py`); its users
   are sent, with the current trainable weights and the round's clip norm C_t (public: fixed,
   or adaptive clipping's post-processed value),
   to Flower nodes (one user per node, or lists of users to cohort workers).
2. Clients reply with the *sum of individually clipped deltas*, a user count and the number of
   users clipped.
3. `aggregate_train`: replies that failed, are non-finite, mis-shaped or exceed the norm
   their count allows are dropped (counted); the rest are summed.
The loop then guards, records, noises and divides by the expected cohort (`privacy/release.py`)
and the server optimizer steps. What the server sees: clipped per-user deltas (central DP,
trusted server).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.privacy import sabotage
from fedsim.privacy.randomness import SecretRandomness
from fedsim.sampling import participation_sampler

log = logging.getLogger("fedsim")


def assign_users_to_nodes(cohort: np.ndarray, node_ids: list[int], users_per_client: int,
                          num_buckets: int | None = None, stride: int = 1) -> list[tuple[int, int, list[int]]]:
    """(node id, message key, users) of each message of a round.

    One user per message (`users_per_client == 1`): user u goes to node u mod #nodes, keyed u.
    Cohort workers: user u belongs to bucket u mod B, whatever else was sampled, one message
    per non-empty bucket (B = `num_buckets`, about expected cohort / users_per_client; a
    bucket holds Binomial-many users around users_per_client), bucket b to node b mod #nodes.
    With cyclic Poisson sampling (banded MF) a round samples only users u = g mod `stride`, so the
    bucket is (u // stride) mod B: u mod B would put a whole round in one bucket when B and the
    number of groups share a factor (b = B = 4: every round one message, one busy worker).
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
    stride = max(1, int(stride))
    for u in users:
        groups.setdefault((u // stride) % buckets, []).append(u)
    return [(node_ids[b % len(node_ids)], b, g) for b, g in sorted(groups.items())]


class UlsStrategy(Strategy):
    name, key, sign = "ULS", "round", 1.0  # the sum is of model deltas

    def __init__(self, *, num_users: int, dimension: int, sampling_rate: float, clip_norm: float,
                 randomness: SecretRandomness,
                 users_per_client: int = 1, expected_cohort: float | None = None, grid: Grid | None = None,
                 timeout: float | None = None, optimizer: tuple[str, float, float] = ("sgd", 1.0, 0.9),
                 present=None, participation_groups: int = 1):
        if not 0 < sampling_rate <= 1:
            raise ValueError("The sampling rate should be in (0, 1].")
        self.num_users, self.dimension, self.q, self.clip_norm = num_users, dimension, sampling_rate, clip_norm
        # messages group users by id into about expected_cohort / users_per_client buckets
        self.expected_cohort = expected_cohort if expected_cohort is not None else sampling_rate * num_users
        # the secret cohort: Poisson(q), or cyclic Poisson over the mechanism's participation groups
        self.sampler = participation_sampler(num_users, sampling_rate, participation_groups, randomness, "uls-cohort")
        self.sampler_groups = int(participation_groups)
        self.users_per_client, self.grid, self.timeout, self.optimizer = users_per_client, grid, timeout, optimizer
        # `fedsim audit`: drops the canaries whose secret coin left them out (fedsim/auditing/canaries.py)
        self.present = present
        self._round: dict = {}

    def summary(self, ledger=None, plan=None, steps: int = 0) -> dict:
        """summary.json's ULS fields: the trust model, and the ledger's epsilon under every other
        accountant that supports it (bounds only; the run's own accountant is the one reported)."""
        from fedsim.account import epsilon_by_accountant

        others = epsilon_by_accountant(ledger, plan.delta) if ledger is not None else {}
        return {"trust_model": "central DP: a trusted server sees per-user clipped deltas", "epsilon_by_accountant": others}

    def clipped_sum(self, step: int, weights: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict, int]:
        """Sample, send the weights and the round's clip norm to the cohort's nodes, sum the valid replies."""
        self.clip_norm = float(clip_norm)  # the replies' norm check uses this round's C
        messages = self.configure_train(step, ArrayRecord({"w": Array(weights.cpu().numpy())}),
                                        ConfigRecord({"clip-norm": self.clip_norm}), self.grid)
        arrays, metrics = self.aggregate_train(step, self.grid.send_and_receive(messages, timeout=self.timeout))
        diagnostics = dict(metrics)
        return torch.from_numpy(arrays["delta-sum"].numpy().copy()), diagnostics, int(diagnostics["examples"])

    # -- training ------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        cohort = self.sampler.sample(server_round)
        real = len(cohort)
        if self.present is not None:  # `fedsim audit`: (users and included canaries, how many are users)
            cohort, real = self.present(cohort)
        node_ids = sorted(grid.get_node_ids())
        buckets = math.ceil(self.expected_cohort / self.users_per_client)
        groups = assign_users_to_nodes(cohort, node_ids, self.users_per_client, buckets, self.sampler_groups)
        self._round = {"cohort": real, "messages": len(groups)}
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
        n = int(met.get("num-users", 0)) + int(met.get("num-canaries", 0))
        # a sum of n clipped deltas has norm <= n*C: anything larger was not clipped
        if not sabotage.active("no-clip") and float(vec.double().pow(2).sum().sqrt()) > n * self.clip_norm * (1 + 1e-4) + 1e-6:  # float64: f32 norms read low
            return None, met, f"norm exceeds {n} x clip norm"
        return vec, met, ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        d = int(self.dimension)
        total = torch.zeros(d, dtype=torch.float32)
        users = examples = clipped = failed_users = canaries = 0
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
            canaries += int(met.get("num-canaries", 0))
        metrics = {  # simulation diagnostics (computed from unnoised user data; diagnostics.jsonl)
            "cohort": self._round.get("cohort", users), "users": users, "examples": examples,
            # adaptive clipping's count: the summed users, and those within the clip (norm <= C)
            "contributions": users, "unclipped": users - clipped,
            "train_loss": loss_sum / max(users, 1), "clipped_frac": clipped / max(users, 1),
            "dropped_replies": dropped, "missing_replies": missing, "failed_users": failed_users,
            "messages": self._round.get("messages", 0)}
        if self.present is not None:  # `fedsim audit`: canaries are never counted as users
            metrics["canaries"] = canaries
        return ArrayRecord({"delta-sum": Array(total.numpy())}), MetricRecord(metrics)

    # -- evaluation happens centrally on the server (evaluate_fn); no federated eval --
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
