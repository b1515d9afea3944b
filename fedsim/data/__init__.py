"""User stores. `build_store(data_config)` picks one from the config."""

from __future__ import annotations

import random

from fedsim.data.base import UserStore, report_notes  # noqa: F401  (report_notes: the stores' note lines)
from fedsim.errors import ConfigError


def eval_examples(store: UserStore, n: int, seed: int) -> list:
    """A fixed, seeded subset of all users' held-out examples: the evaluation set of every method (ULS, ELS)."""
    rng = random.Random(seed)
    if store.num_users <= 10_000:
        pool = [x for u in range(store.num_users) for x in store.test_examples(u)]
    else:  # never touch a whole large population: held-out examples of a seeded sample of users
        pool = []
        for u in rng.sample(range(store.num_users), min(store.num_users, 4 * n)):
            pool.extend(store.test_examples(u))
            if len(pool) >= 4 * n:
                break
    rng.shuffle(pool)
    return pool[:n]


def build_store(cfg) -> UserStore:
    if cfg.source == "shakespeare":
        from fedsim.data.shakespeare import ShakespeareStore

        return ShakespeareStore(cfg.public_plays, cfg.min_examples, cfg.test_fraction, cfg.max_users, cfg.seed)
    if cfg.source == "synthetic":
        from fedsim.data.synthetic import SyntheticTokenStore

        if cfg.examples_per_user is None and cfg.max_examples < cfg.min_examples:
            raise ConfigError(f"data.max_examples ({cfg.max_examples}) must be >= "
                              f"data.min_examples ({cfg.min_examples})")
        n = cfg.num_users if cfg.max_users is None else min(cfg.num_users, cfg.max_users)
        return SyntheticTokenStore(n, cfg.seed, seq_len=cfg.seq_len, test_fraction=cfg.test_fraction,
                                   min_examples=cfg.min_examples, max_examples=cfg.max_examples,
                                   examples_per_user=cfg.examples_per_user, population=cfg.num_users)
    if cfg.source == "files":
        from fedsim.data.files import FileUserStore

        if not cfg.path:
            raise ConfigError("data.path is required when data.source is 'files'")
        return FileUserStore(cfg.path, cfg.user_column, cfg.text_column, cfg.test_fraction, cfg.min_examples,
                             max_users=cfg.max_users, max_example_bytes=cfg.max_example_bytes,
                             long_examples=cfg.long_examples, public_path=cfg.public_path)
    raise ConfigError(f"data.source {cfg.source!r} is not available yet")
