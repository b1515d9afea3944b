"""Per-process cache of cohort workers: the model is built once per process (Ray actor),
not once per Flower message (ClientApps are rebuilt per message), on the device Ray gave
the process (`worker_device`)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading

_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()
log = logging.getLogger("fedsim")


def ray_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to this process (an actor placed with simulation.num_gpus > 0), as
    strings; [] outside a Ray worker (the driver, the in-process grid) or without a GPU."""
    import sys

    if "ray" not in sys.modules:  # never import Ray only to learn that it is not running
        return []
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return []
        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # not inside a Ray worker after all
        return []


def cuda_index(gpu_ids: list[str], visible: str | None) -> int:
    """torch's index of the first GPU Ray assigned: its position in CUDA_VISIBLE_DEVICES (Ray sets
    that to the assigned ids, so the assigned GPU is cuda:0 of the process), or the id itself when
    the variable is unset (Ray told not to set it: RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)."""
    from fedsim.errors import ModelError

    gid = str(gpu_ids[0]).strip()
    listed = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    if not listed:
        return int(gid)
    if gid not in listed:
        raise ModelError(f"Ray assigned GPU {gid} but CUDA_VISIBLE_DEVICES={visible} does not list it")
    return listed.index(gid)


def worker_device(cfg, gpu_ids: list[str] | None = None):
    """The device of a cohort worker's model. A process Ray gave a GPU (or a fraction of one) trains
    on that GPU, whatever run.device says (cuda, auto): `cuda_index` of Ray's assignment, so workers
    packed on different GPUs use different GPUs. Given a GPU by Ray but without CUDA (logical GPUs,
    e.g. ray.init(num_gpus=2) on a CPU machine, or a node that declared GPUs it does not have), it
    trains on the CPU and says so (a warning in the worker's log). run.device cpu keeps the CPU.
    Without a Ray GPU: run.device, as the server resolves it."""
    import torch

    from fedsim.models.causal_lm import resolve_device

    gpu_ids = ray_gpu_ids() if gpu_ids is None else gpu_ids
    if not gpu_ids or cfg.run.device == "cpu":
        return resolve_device(cfg.run.device)
    if not torch.cuda.is_available():
        log.warning("Ray assigned GPU %s to this worker (pid %d) but torch sees no CUDA device: training on the"
                    " CPU (a logical GPU?)", ",".join(gpu_ids), os.getpid())
        return torch.device("cpu")
    return torch.device("cuda", cuda_index(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES")))


def get_worker(cfg):
    from fedsim.data import build_store
    from fedsim.models import build_task
    from fedsim.training.worker import CohortWorker

    key = hashlib.sha256(cfg.to_json().encode()).hexdigest()
    with _LOCK:
        w = _CACHE.get(key)
        if w is None:
            import torch

            torch.set_num_threads(cfg.run.threads or 1)
            from fedsim.auditing.canaries import with_canaries

            store = with_canaries(build_store(cfg.data), cfg)  # `fedsim audit`: canary users appended
            w = CohortWorker(build_task(cfg, store, device=worker_device(cfg), log=lambda *_: None), store, cfg)
            _CACHE.clear()  # one config per process at a time
            _CACHE[key] = w
        return w
