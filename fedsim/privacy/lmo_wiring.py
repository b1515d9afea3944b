"""`dp.mechanism: lmo` for a run: build the LMO mechanism and account it faithfully.

The budget guard and the reported epsilon use the `lmo_faithful` accountant (the only
accountant that supports `LmoDpEvent`); the paper's own accounting is never used for a
run's budget (see `fedsim.privacy.lmo` for why).
"""

from __future__ import annotations

from fedsim.errors import ConfigError


def plan_lmo(cfg, num_users: int, q: float, delta: float, warnings: list[str], dimension: int | None = None):
    from fedsim.lmo_search import calibrate_lmo_mechanism
    from fedsim.privacy.lmo import LmoMechanism, LmoParams, faithful_epsilon
    from fedsim.uls import UlsPlan

    dp, rounds = cfg.dp, cfg.run.rounds
    if dp.accountant not in ("lmo_faithful",):
        warnings.append(f"dp.accountant={dp.accountant} cannot account for LMO noise; using lmo_faithful")
    spec = dp.lmo or {}
    try:
        if "search" in spec:
            mech = LmoMechanism.from_search_result(dp.clip_norm, spec["search"], dimension=dimension)
        elif spec:
            mech = LmoMechanism(dp.clip_norm, LmoParams.from_dict(spec), dimension=dimension)
        else:
            if dp.epsilon is None:
                raise ConfigError("dp.mechanism=lmo needs dp.epsilon (to search parameters) or dp.lmo parameters")
            mech = calibrate_lmo_mechanism(dp.clip_norm, target_epsilon=dp.epsilon, delta=delta, q=q, steps=rounds,
                                           dimension=dimension)
    except (TypeError, KeyError, ValueError, OSError) as exc:
        raise ConfigError(f"dp.lmo: {exc}") from None
    eps = faithful_epsilon(mech.params, q=q, steps=rounds, delta=delta, dimension=dimension)
    if dp.epsilon is not None and eps > dp.epsilon:
        raise ConfigError(f"dp.lmo parameters give faithful epsilon={eps:.4g} over {rounds} rounds, above dp.epsilon={dp.epsilon:g}")
    target = dp.epsilon if dp.epsilon is not None else eps
    return UlsPlan(num_users, q, delta, rounds, mech, target, eps, warnings, accountant="lmo_faithful")
