"""fedsim ClientApp: a Flower node trains the users named in the message and returns the
sum of their individually clipped deltas (one user per node, or a list in scale mode)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.workers import get_worker


def handle_train(worker, content: RecordDict) -> RecordDict:
    # load the global trainable weights
    global_flat = torch.from_numpy(np.asarray(content["arrays"]["w"].numpy(), dtype=np.float32).copy())
    # which users, which round
    cfg = content["config"]
    users = [int(u) for u in cfg["user-ids"]]
    server_round = int(cfg["server-round"])
    # train each user, clip each delta, sum
    res = worker.train_users(users, global_flat, server_round)
    # reply: the clipped sum and counts (never a single unclipped delta)
    return RecordDict({
        "arrays": ArrayRecord({"delta-sum": Array(res.delta_sum.detach().cpu().numpy().astype(np.float32))}),
        "metrics": MetricRecord({
            "num-users": res.num_users, "num-examples": res.num_examples, "loss-sum": res.loss_sum,
            "num-clipped": res.clipped, "num-failed": res.failed,
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
