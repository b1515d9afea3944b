"""Assemble and run the Flower app: the ServerApp (server/) and ClientApp (clients/) on
Flower's simulation engine with the Ray backend, or in-process (the same strategy, messages and
workers, no Ray).

This is the one module of `fedsim` that imports the Flower glue packages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from pathlib import Path

from fedsim.compat import (
    lean_local_ray,
    poll_interval,
    polling_messages_every,
    replacing_dead_ray_actors,
    set_message_ids_outside_a_superlink,
)
from fedsim.errors import FedsimError


class InProcessGrid:
    """A Grid that runs the ClientApp handler in this process: for tests and debugging.

    Each message is handled as a Flower node would: an exception becomes an error reply, a
    reply slower than the timeout is not returned.
    """

    def __init__(self, cfg, num_nodes: int):
        set_message_ids_outside_a_superlink()  # Messages need ids outside a SuperLink
        self.cfg, self._nodes = cfg, list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return list(self._nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        from clients.client_app import handle_train
        from fedsim.workers import get_worker

        replies = []
        for msg in messages:
            t0 = time.monotonic()
            try:
                worker = get_worker(self.cfg)  # built once per process, before a node's clock starts
                t0 = time.monotonic()
                content = handle_train(worker, msg.content)
                reply = Message(content=content, reply_to=msg)
            except Exception as exc:  # a failing client is a failed reply, not a crashed server
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            # Flower returns only the replies that arrive before the round's timeout. Here the
            # nodes run one after another, so each message gets the whole timeout, as if they ran
            # at once; a slower one is lost like a late reply.
            if timeout is None or time.monotonic() - t0 <= timeout:
                replies.append(reply)
        return replies


def num_nodes_for(cfg, num_users: int) -> int:
    if cfg.uls.users_per_client == 1:
        return num_users  # one Flower node per user
    if cfg.simulation.num_workers:
        return cfg.simulation.num_workers
    return max(1, int((os.cpu_count() or 1) // cfg.simulation.num_cpus))


def quiet_logs(verbose: bool) -> None:
    import warnings

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    for target in [flwr_logger, *flwr_logger.handlers]:  # fedsim calls `run_simulation` on purpose: not news
        target.addFilter(lambda record: "DEPRECATED FEATURE" not in record.getMessage())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if verbose:
        return
    flwr_logger.propagate = False  # run_simulation lowers flwr's level to DEBUG; keep its records off the root
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def run_flower(cfg, plan, task, evalset, run_dir: Path, randomness, say=print, resume: bool = False,
               observer=None) -> dict:
    """Train `plan` with ULS on Flower: in-process, or on the Ray backend (a local Ray, or the
    cluster at simulation.ray_address); returns the summary."""
    from server.server_app import run_server

    args = (cfg, plan, task, evalset, run_dir, randomness)
    nodes = num_nodes_for(cfg, plan.num_users)
    if cfg.simulation.backend == "inprocess":
        return run_server(InProcessGrid(cfg, nodes), *args, say, resume, observer=observer)

    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from fedsim import interrupt
    from server.server_app import make_server_app

    outcome: dict = {}
    backend_config = ray_backend_config(cfg)
    cluster = None

    def simulate() -> None:
        try:
            with replacing_dead_ray_actors(), polling_messages_every(poll_interval(nodes)):
                run_simulation(server_app=make_server_app(outcome, *args, say=print, resume=resume,
                                                               observer=observer, poll_seconds=poll_interval(nodes)),
                               client_app=make_client_app(cfg), num_supernodes=nodes, backend_config=backend_config,
                               verbose_logging=cfg.simulation.verbose)
        except BaseException as exc:
            outcome.setdefault("error", exc)

    try:
        # Ray starts here, in the calling thread, as Flower's backend would (it then reuses this
        # connection); `ray.init` would replace a SIGTERM handler fedsim/interrupt.py installed
        with interrupt.keeping_handlers():
            if cfg.simulation.ray_address:
                cluster = connect_ray_cluster(cfg)
            else:
                init_ray(cfg)
        if cluster is None and cfg.simulation.num_gpus > 0 and not _cuda_available():
            say(f"note: Ray has {ray_gpus():g} logical GPU(s) and this machine no CUDA: Ray places the workers"
                f" ({cfg.simulation.num_gpus:g} GPU each) and they train on the CPU")
        if cluster is not None:
            if cfg.uls.users_per_client > 1 and not cfg.simulation.num_workers:
                nodes = cluster["actors"]  # one cohort worker per actor slot of the whole cluster
            say(f"Ray cluster {cluster['address']}: {cluster['nodes']} node(s), {cluster['cpus']:g} CPUs,"
                f" {cluster['gpus']:g} GPUs, {cluster['actors']} actor slot(s) of {backend_config['client_resources']}")
        # Flower's engine blocks its caller in an unbounded join of its worker threads while the
        # ServerApp (the loop) runs in a thread of its own. Run it in a thread too, and keep this
        # one free to take Ctrl-C: a stop request ends the loop after its round; the ServerApp's
        # end stops the engine, which stops the actors and Ray (fedsim/interrupt.py).
        engine = threading.Thread(target=simulate, name="fedsim-flower-simulation", daemon=True)
        with interrupt.deferred():
            engine.start()
            interrupt.wait_for(engine)
    finally:
        _shutdown_ray()  # with a cluster address this only disconnects: the cluster keeps running
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise FedsimError(f"the Flower simulation ended without a result; see {run_dir}")
    summary = outcome["summary"]
    if cluster is not None:  # say where the clients ran
        from fedsim.rundir import RunWriter

        summary["ray_cluster"] = cluster
        RunWriter(run_dir).write_json("summary.json", summary)
    return summary


def check_devices(cfg) -> None:
    """Refuse a GPU request this machine cannot serve, before any process starts (exit 2,
    one line): run.device cuda without CUDA, or simulation.num_gpus on a local Ray without
    a GPU. With simulation.ray_address the GPUs may be on other machines: the cluster is
    checked when fedsim joins it (`connect_ray_cluster`). A Ray this process already started
    with GPUs (`ray.init(num_gpus=N)` before `fedsim.run`: logical GPUs, for placement tests)
    is taken at its word: Ray places the workers, and a worker without CUDA trains on the CPU
    (`fedsim.workers.worker_device`)."""
    from fedsim.models.causal_lm import resolve_device

    resolve_device(cfg.run.device)  # ModelError when cuda is asked for and absent
    if cfg.simulation.backend == "ray" and cfg.simulation.num_gpus > 0 and not cfg.simulation.ray_address:
        import torch

        if not torch.cuda.is_available() and not ray_gpus():
            raise FedsimError(f"simulation.num_gpus={cfg.simulation.num_gpus:g} but no CUDA device is available"
                              " (set simulation.num_gpus=0, or simulation.ray_address of a cluster with GPUs)")


def ray_gpus() -> float:
    """GPUs of the Ray this process is connected to (0 when it is not: Ray is never imported for this)."""
    import sys

    if "ray" not in sys.modules:
        return 0.0
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def ray_backend_config(cfg) -> dict:
    """Flower's Ray backend config: resources per actor (one actor = one Flower node's
    ClientApp process; fractional num_gpus packs 1/num_gpus actors on a GPU) and ray.init args."""
    sim = cfg.simulation
    init_args: dict = {"logging_level": "INFO" if sim.verbose else "ERROR", "log_to_driver": bool(sim.verbose)}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    return {"client_resources": {"num_cpus": float(sim.num_cpus), "num_gpus": float(sim.num_gpus)},
            "init_args": init_args}


def init_ray(cfg) -> None:
    """ray.init (a local Ray, or the cluster at simulation.ray_address) the way Flower's Ray
    backend would: the same init args, and this process's PYTHONPATH handed to the workers.
    Flower's backend then reuses the connection."""
    import sys

    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    if not ray.is_initialized():
        # a local head without the monitors nothing here uses (fedsim/compat.py); a cluster is as started
        lean = contextlib.nullcontext() if cfg.simulation.ray_address else lean_local_ray(cfg.simulation.verbose)
        with lean:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                     **local_ray_resources(cfg), **ray_backend_config(cfg)["init_args"])


def local_ray_resources(cfg) -> dict:
    """A local Ray sized to the cohort workers asked for: Flower starts one actor for every
    `simulation.num_cpus` CPUs Ray has, and with `simulation.num_workers` set the others would
    never get a message yet each holds torch and the model's libraries (~380 MB measured,
    bench/ray_memory.py). {} for a cluster, or when the workers follow the machine."""
    sim = cfg.simulation
    if sim.ray_address or not sim.num_workers or cfg.uls.users_per_client == 1:
        return {}
    return {"num_cpus": max(1, int(math.ceil(sim.num_workers * sim.num_cpus)))}


def connect_ray_cluster(cfg) -> dict:
    """ray.init(address=simulation.ray_address) the way Flower's backend would (same
    PYTHONPATH handed to the workers), and describe the cluster: address, live nodes, CPUs,
    GPUs and how many actors of the configured resources fit (Flower's own count)."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    address = cfg.simulation.ray_address
    args = ray_backend_config(cfg)
    try:
        init_ray(cfg)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise FedsimError(f"cannot join the Ray cluster at simulation.ray_address={address}: "
                          f"{type(exc).__name__}: {exc}") from None
    alive = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    res = ray.cluster_resources()
    resources = args["client_resources"]
    gpus = float(res.get("GPU", 0))
    if resources["num_gpus"] > 0 and gpus == 0:
        _shutdown_ray()
        raise FedsimError(f"simulation.num_gpus={resources['num_gpus']:g} but the Ray cluster at {address} has no GPU")
    try:
        actors = pool_size_from_resources(resources)
    except ValueError:
        _shutdown_ray()
        raise FedsimError(f"no node of the Ray cluster at {address} fits one client of {resources}"
                          " (lower simulation.num_cpus / num_gpus)") from None
    return {"address": ray.get_runtime_context().gcs_address, "requested_address": address, "nodes": len(alive),
            "cpus": float(res.get("CPU", 0)), "gpus": gpus, "actors": int(actors)}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # best effort: Ray may already be gone
        pass
