"""fedsim ClientApp: a Flower node trains the users named in the message and returns the
sum of their individually clipped deltas (one user per node, or a list in scale mode)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.workers import get_worker


def inject_fault(faults, server_round: int, message_key: int) -> str | None:
    """Which fault (if any) this message suffers: seeded by (fault seed, round, message key),
    the key being the user (one user per message) or the user-id bucket (cohort workers), so
    a message's fate never depends on who else was sampled."""
    rates = faults.rates()
    if not any(r for _, r in rates):
        return None
    u = float(np.random.default_rng([faults.seed, server_round, int(message_key)]).random())
    acc = 0.0
    for kind, rate in rates:
        acc += rate
        if u < acc:
            return kind
    return None


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # no Ray, or not inside it
        return False


def handle_train(worker, content: RecordDict) -> RecordDict:
    # load the global trainable weights
    global_flat = torch.from_numpy(np.asarray(content["arrays"]["w"].numpy(), dtype=np.float32).copy())
    # which users, which round, which clip norm (the server's C for this round)
    cfg = content["config"]
    users = [int(u) for u in cfg["user-ids"]]
    server_round = int(cfg["server-round"])
    clip_norm = float(cfg["clip-norm"]) if "clip-norm" in cfg else worker.cfg.dp.clip_norm
    # fault injection (tests, demos): a failing client, a NaN or mis-shaped reply, a dying worker, a slow one
    key = int(cfg["message-key"]) if "message-key" in cfg else (users[0] if users else -1)
    fault = inject_fault(worker.cfg.simulation.faults, server_round, key)
    if fault == "raise":
        raise RuntimeError(f"injected client failure (round {server_round})")  # no user ids: the cohort is secret
    if fault == "kill" and _in_ray_worker():  # only ever kill a Ray worker process, never the server
        os._exit(17)
    if fault == "hang":  # a slow client: its reply misses the round when hang_seconds > simulation.timeout
        time.sleep(worker.cfg.simulation.faults.hang_seconds)
    # train each user, clip each delta, sum
    res = worker.train_users(users, global_flat, server_round, clip_norm=clip_norm)
    if fault == "nan":
        res.delta_sum[0] = float("nan")
    elif fault == "shape":
        res.delta_sum = res.delta_sum[:-1]
    # reply: the clipped sum and counts (never a single unclipped delta)
    return RecordDict({
        "arrays": ArrayRecord({"delta-sum": Array(res.delta_sum.detach().cpu().numpy().astype(np.float32))}),
        "metrics": MetricRecord({
            "num-users": res.num_users, "num-examples": res.num_examples, "loss-sum": res.loss_sum,
            "num-clipped": res.clipped, "num-failed": res.failed, "num-canaries": res.canaries,
        }),
    })


def config_from_context(context: Context):
    """`flwr run .`: the run config holds `config` (a YAML path) and dotted overrides."""
    from fedsim.config import config_from_json, load_config

    rc = dict(context.run_config)
    if "config-json" in rc:
        return config_from_json(str(rc["config-json"]))
    path = rc.pop("config", "configs/default.yaml")
    return load_config(path, [f"{k}={v}" for k, v in rc.items()])


def make_client_app(cfg=None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        worker = get_worker(cfg if cfg is not None else config_from_context(context))
        return Message(content=handle_train(worker, msg.content), reply_to=msg)

    return app


app = make_client_app()
