"""User stores. `build_store(data_config)` picks one from the config."""

from __future__ import annotations

from fedsim.data.base import UserStore


def build_store(cfg) -> UserStore:
    if cfg.source == "shakespeare":
        from fedsim.data.shakespeare import ShakespeareStore

        return ShakespeareStore(cfg.public_plays, cfg.min_examples, cfg.test_fraction, cfg.max_users, cfg.seed)
    from fedsim.errors import ConfigError

    raise ConfigError(f"data.source {cfg.source!r} is not available yet")
