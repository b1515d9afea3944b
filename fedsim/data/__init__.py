"""User stores. `build_store(data_config)` picks one from the config."""

from __future__ import annotations

from fedsim.data.base import UserStore


def eval_examples(store: UserStore, n: int, seed: int) -> list:
    """A fixed, seeded subset of every user's held-out examples: the evaluation set of
    every method (ULS and ELS evaluate on the same examples)."""
    import random

    pool = [x for u in range(store.num_users) for x in store.test_examples(u)]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def build_store(cfg) -> UserStore:
    if cfg.source == "shakespeare":
        from fedsim.data.shakespeare import ShakespeareStore

        return ShakespeareStore(cfg.public_plays, cfg.min_examples, cfg.test_fraction, cfg.max_users, cfg.seed)
    from fedsim.errors import ConfigError

    raise ConfigError(f"data.source {cfg.source!r} is not available yet")
