"""Assemble and run the Flower app: the ServerApp (server/) and ClientApp (clients/) on
Flower's simulation engine with the Ray backend, or in-process (same logic, no Ray).

This is the one module of `fedsim` that imports the Flower glue packages.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedsim.errors import FedsimError


class InProcessGrid:
    """A Grid that runs the ClientApp handler in this process: for tests and debugging.

    Each message is handled as a Flower node would: an exception becomes an error reply.
    """

    def __init__(self, cfg, num_nodes: int):
        from flwr.supercore.task_identity import TaskIdentity

        for attr_name in ("run_id", "node_id", "task_id"):  # Messages need ids outside a SuperLink
            try:
                getattr(TaskIdentity, attr_name)
            except RuntimeError:
                setattr(TaskIdentity, attr_name, 0)
        self.cfg, self._nodes = cfg, list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return list(self._nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        from clients.client_app import handle_train
        from fedsim.workers import get_worker

        replies = []
        for msg in messages:
            try:
                content = handle_train(get_worker(self.cfg), msg.content)
                replies.append(Message(content=content, reply_to=msg))
            except Exception as exc:  # a failing client is a failed reply, not a crashed server
                replies.append(Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


def num_nodes_for(cfg, num_users: int) -> int:
    if cfg.uls.users_per_client == 1:
        return num_users  # one Flower node per user
    if cfg.simulation.num_workers:
        return cfg.simulation.num_workers
    return max(1, int((os.cpu_count() or 1) // cfg.simulation.num_cpus))


class _DropDeprecationNotice(logging.Filter):
    """fedsim calls `run_simulation` on purpose (`flwr run .` is offered too); its notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def _quiet_logs(verbose: bool) -> None:
    import warnings

    level = logging.INFO if verbose else logging.WARNING
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(level)
    for target in [flwr_logger, *flwr_logger.handlers]:
        target.addFilter(_DropDeprecationNotice())
    if not verbose:  # run_simulation lowers flwr's level to DEBUG; keep its records off the root handlers
        flwr_logger.propagate = False
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:
            pass
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        os.environ.setdefault("RAY_LOG_TO_STDERR", "0")


def resume_uls(run_dir: str | Path, say=print) -> tuple[Path, dict]:
    """Continue a ULS run from its last checkpoint, with the config it was started with."""
    from fedsim.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FedsimError(f"{run_dir} is not a fedsim run directory (no config.yaml)")
    if (run_dir / "summary.json").is_file():
        raise FedsimError(f"{run_dir} already finished (summary.json exists); nothing to resume")
    return run_uls(load_config(run_dir / "config.yaml"), say, resume_dir=run_dir)


def run_uls(cfg, say=print, resume_dir: Path | None = None) -> tuple[Path, dict]:
    """Run a ULS experiment (or resume one in `resume_dir`); returns (run directory, summary)."""
    from fedsim.data import build_store
    from fedsim.models.causal_lm import check_model_source
    from fedsim.rundir import create_run_dir
    from fedsim.uls import plan_uls

    # fail on bad input before any process is started or file written
    store = build_store(cfg.data)
    check_model_source(cfg)
    if cfg.dp.mechanism == "gaussian":
        plan = plan_uls(cfg, store.num_users)
    else:  # LMO parameters are searched/checked by the server with the model's dimension
        from fedsim.uls import resolve_delta, sampling_rate

        sampling_rate(cfg, store.num_users)
        resolve_delta(cfg, store.num_users)
    if cfg.dp.mechanism == "gaussian" and cfg.dp.noise_multiplier is None:
        # record the calibrated sigma in the resolved config; the target epsilon stays the budget
        cfg = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"noise_multiplier": plan.mechanism.noise_multiplier})})
    if resume_dir is not None:
        from fedsim.checkpoint import load_checkpoint

        load_checkpoint(resume_dir)  # a missing or corrupt checkpoint fails here, before Ray starts
        run_dir = Path(resume_dir)
    else:
        run_dir = create_run_dir(cfg)
    _quiet_logs(cfg.simulation.verbose)
    say(f"run directory: {run_dir}")
    # One intra-op thread unless asked: the tiny per-user batches gain nothing from more, and
    # OpenMP threads spinning beside Ray actors (which Ray pins to 1 thread) slowed rounds ~50x.
    import torch

    torch.set_num_threads(cfg.run.threads or 1)
    nodes = num_nodes_for(cfg, store.num_users)
    if cfg.simulation.backend == "inprocess":
        from server.server_app import run_server

        return run_dir, run_server(InProcessGrid(cfg, nodes), cfg, run_dir, say, resume=resume_dir is not None)

    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import make_server_app

    outcome: dict = {}
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": {"logging_level": "INFO" if cfg.simulation.verbose else "ERROR",
                      "log_to_driver": bool(cfg.simulation.verbose)},
    }
    if cfg.simulation.ray_address:
        backend_config["init_args"]["address"] = cfg.simulation.ray_address
    run_simulation(
        server_app=make_server_app(cfg, run_dir, outcome, resume=resume_dir is not None),
        client_app=make_client_app(cfg),
        num_supernodes=nodes,
        backend_config=backend_config,
        verbose_logging=cfg.simulation.verbose,
    )
    _shutdown_ray()
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise FedsimError(f"the Flower simulation ended without a result; see {run_dir}")
    return run_dir, outcome["summary"]


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # best effort: Ray may already be gone
        pass
