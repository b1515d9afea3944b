"""Per-process cache of cohort workers: the model is built once per process (Ray actor),
not once per Flower message (ClientApps are rebuilt per message)."""

from __future__ import annotations

import hashlib
import threading

_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()


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
            w = CohortWorker(build_task(cfg, store, log=lambda *_: None), store, cfg)
            _CACHE.clear()  # one config per process at a time
            _CACHE[key] = w
        return w
