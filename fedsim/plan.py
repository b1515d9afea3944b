"""The plan of a run: everything its privacy rests on, computed once before anything is
written or trained and passed down frozen; never written back into the config
(docs/architecture.md, "The plan"). `plan_compute`: the matched compute of `fedsim compare`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from dp_accounting import dp_event

from fedsim.errors import ConfigError
from fedsim.privacy.accounting import (
    accountant_names,
    epsilon,
    make_accountant,
    options_for,
)
from fedsim.privacy.mechanisms import NoiseMechanism


@dataclass(frozen=True)
class Plan:
    method: str  # "ULS" or "ELS"
    num_users: int
    q: float  # user (ULS) or example (ELS) sampling rate
    delta: float
    steps: int  # planned rounds (ULS) or steps (ELS)
    mechanism: NoiseMechanism
    accountant: str  # reports epsilon and guards the budget
    accountant_options: dict
    target_epsilon: float | None  # None: non-private
    planned_epsilon: float  # epsilon after all planned releases under the accountant
    denominator: float  # the public divisor of the noisy sum: expected cohort (ULS) or batch (ELS)
    warnings: tuple[str, ...] = ()
    k: int | None = None  # ELS: examples kept per user
    example_user: np.ndarray | None = field(default=None, repr=False)  # ELS: owner of each kept example
    example_index: np.ndarray | None = field(default=None, repr=False)  # ELS: its index among the owner's
    group_epsilon: float | None = None  # ELS: the group-privacy bound at the same sigma and delta
    # what the user store left out or changed (UserStore.data_report): a diagnostic, set by loop.prepare
    data_report: dict | None = field(default=None, compare=False)

    @property
    def event(self) -> dp_event.DpEvent:
        """One release (a round or a step) as the accountants see it."""
        return self.mechanism.sampled_event(self.q) if self.k is None else self.mechanism.mixture_event(self.k, self.q)

    @property
    def denominator_name(self) -> str:
        return "expected_cohort" if self.k is None else "expected_batch"

    def make_accountant(self):
        return make_accountant(self.accountant, **self.accountant_options)

    @property
    def num_examples(self) -> int:
        return int(self.example_user.size) if self.example_user is not None else 0

    def texts(self, store, idx: np.ndarray) -> list:
        return [store.train_examples(int(self.example_user[i]))[int(self.example_index[i])] for i in idx]

    def describe(self) -> dict:
        """The plan's fields of summary.json (what `fedsim account RUN_DIR` needs included)."""
        out = {"method": self.method, "num_users": self.num_users, "q": self.q, "delta": self.delta,
               "planned_steps": self.steps, "target_epsilon": self.target_epsilon,
               "planned_epsilon": self.planned_epsilon, "accountant": self.accountant,
               "accountant_options": dict(self.accountant_options), "mechanism": self.mechanism.describe(),
               "noise": self.mechanism.noise_label(),
               "noise_multiplier": self.mechanism.describe().get("noise_multiplier"),
               self.denominator_name: self.denominator,
               "warnings": list(self.warnings)}
        if self.k is not None:
            out.update(k=self.k, num_examples=self.num_examples, group_privacy_epsilon=self.group_epsilon)
        if self.data_report:
            out["data_report"] = dict(self.data_report)
        return out


# -- delta and sampling rates ----------------------------------------------------------------------


def default_delta(num_users: int) -> float:
    """min(1e-5, 1 / N^1.1): below 1/N, the usual requirement for a meaningful user-level delta."""
    return min(1e-5, 1.0 / num_users**1.1)


def resolve_delta(cfg, num_users: int) -> tuple[float, list[str]]:
    if cfg.dp.delta is None and (cfg.uls.sampling_rate is not None or cfg.els.sampling_rate is not None):
        # the default delta is a function of N: it would put the population size back into the output
        raise ConfigError("uls.sampling_rate / els.sampling_rate keep N out of the mechanism: set dp.delta"
                          " explicitly too (the default min(1e-5, 1/N^1.1) depends on N)")
    delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(num_users)
    warnings = []
    if delta >= 1.0 / num_users:
        warnings.append(f"dp.delta={delta:g} >= 1/users={1.0 / num_users:g}: a mechanism may then leak one user's data outright")
    return delta, warnings


def untrained_base(cfg) -> tuple[str, str] | None:
    """(why, what to set) when the model would start from a random initialisation: model.source: config
    and no public pre-training (disabled, or no public data for it); else None. Mirrors `CausalLMTask`,
    which pre-trains on `store.public_examples()`: the Shakespeare plays kept public, a files store's
    data.public_path; the synthetic source has none."""
    m, d = cfg.model, cfg.data
    if m.source != "config":
        return None
    off = ("model.pretrain.enabled=false" if not m.pretrain.enabled
           else "model.pretrain.steps=0" if m.pretrain.steps == 0 else None)
    no_public = {
        "shakespeare": None if d.public_plays else ("data.public_plays=0", "data.public_plays > 0"),
        "files": None if d.public_path else ("data.source=files without data.public_path",
                                             "data.public_path: a JSONL / CSV / Parquet file of public texts"),
        "synthetic": ("data.source=synthetic has no public texts", "data.source: files with data.public_path"),
    }[d.source]
    if off is None and no_public is None:
        return None
    reasons = [r for r in (off, no_public and no_public[0]) if r]
    fixes = (["model.pretrain.enabled: true, model.pretrain.steps > 0"] if off else []) + ([no_public[1]] if no_public
                                                                                           else [])
    return "; ".join(reasons), ", ".join(fixes)


def config_warnings(cfg, private: bool = True) -> list[str]:
    """Warnings about the config itself (printed as `warning: ...` and listed in summary.json)."""
    out = []
    if (why := untrained_base(cfg)) is not None:
        reason, fix = why
        what = ("LoRA adapts a frozen, randomly initialised base model, which cannot learn much" if cfg.model.lora.enabled
                else "every weight trains from a random initialisation, which learns far less than fine-tuning a"
                " pretrained model")
        out.append(f"the model is not pretrained ({reason}): {what} (eval loss starts near ln 257 = 5.55 with"
                   " the byte tokenizer); use a pretrained model (model.source: local, model.path: a Hugging Face"
                   f" model directory) or public pre-training ({fix})")
    if cfg.dp.reproducible and private:
        out.append("dp.reproducible=true: the cohorts, ELS samples and noise are derived from run.seed, which"
                   " config.yaml records, so the reported epsilon does not hold; for tests and debugging only,"
                   " never for real data (set dp.reproducible: false)")
    return out


def sampling_rate(cfg, num_users: int) -> float:
    """ULS q: `uls.sampling_rate` if set, else expected_cohort / N (N is then treated as public)."""
    if cfg.uls.sampling_rate is not None:
        return cfg.uls.sampling_rate
    q = cfg.uls.expected_cohort / num_users
    if q > 1:
        raise ConfigError(f"uls.expected_cohort={cfg.uls.expected_cohort:g} is larger than the {num_users} users (q={q:.3g} > 1)")
    return q


def example_sampling_rate(expected_batch: float, num_examples: int, k: int) -> float:
    if num_examples < 1:
        raise ConfigError("ELS has no training examples to sample from")
    q = expected_batch / num_examples
    if q > 1:
        raise ConfigError(f"els.expected_batch={expected_batch:g} is larger than the data: {num_examples} examples are"
                          f" kept with els.k={k} (q={q:.3g} > 1); lower els.expected_batch or raise els.k")
    return q


def kept_examples(counts, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, index) of every kept example, in (user, index) order: at most k per user, a uniform
    seeded choice (public randomness, run.seed). A user with at most k examples keeps them all; the
    others keep a uniform k-subset drawn by Floyd's algorithm, run for all of them at once (k numpy
    passes over those users). Never a loop over users, and memory is O(users + kept examples): an
    example that is not kept is never materialised (342k StackOverflow-shaped users, 2.0M training posts,
    k = 4: 725k kept, 0.02 s and 26 MB, where a sort of every post took 0.5 s and 93 MB)."""
    counts = np.asarray(counts, dtype=np.int64)
    k = int(k)
    kept = np.minimum(counts, k)
    ends = np.cumsum(kept)
    users = np.repeat(np.arange(counts.size, dtype=np.int64), kept)
    index = np.arange(users.size, dtype=np.int64) - np.repeat(ends - kept, kept)  # 0..kept-1 within a user
    big = np.flatnonzero(counts > k)
    if big.size:
        rng = np.random.default_rng([int(seed), 17])
        n = counts[big]
        chosen = np.empty((big.size, k), dtype=np.int64)
        for j in range(k):  # Floyd: for J = n-k+j, draw t in [0, J]; take J instead if t was already taken
            top = n - k + j
            t = rng.integers(0, top + 1)
            taken = (chosen[:, :j] == t[:, None]).any(axis=1)
            chosen[:, j] = np.where(taken, top, t)
        chosen.sort(axis=1)
        rows = (ends[big] - k)[:, None] + np.arange(k)  # each big user's k slots, already in user order
        index[rows.ravel()] = chosen.ravel()
    return users, index


# -- the mechanism and its accountant ----------------------------------------------------------------


#: dp.mechanism -> (module, class): imported when a run names it
MECHANISMS = {"gaussian": ("fedsim.privacy.mechanisms", "GaussianMechanism"),
              "lmo": ("fedsim.privacy.lmo", "LmoMechanism"),
              "banded_mf": ("fedsim.privacy.mechanisms", "BandedMFMechanism")}


def mechanism_class(name: str) -> type[NoiseMechanism]:
    import importlib

    module, cls = MECHANISMS[name]
    return getattr(importlib.import_module(module), cls)


def _run_mechanism_class(cfg, *, q: float, steps: int, k: int | None) -> type[NoiseMechanism]:
    """dp.mechanism's class, bound to this run's shape where the mechanism needs it: banded MF's
    strategy (dp.banded_mf) for the planned rounds. Its bad parameters are one-line ConfigErrors."""
    cls = mechanism_class(cfg.dp.mechanism)
    if cfg.dp.mechanism != "banded_mf":
        return cls
    from fedsim.config import BandedMfConfig

    mf = cfg.dp.banded_mf or BandedMfConfig()
    if k is not None:
        raise ConfigError("dp.mechanism=banded_mf is a ULS mechanism (cyclic Poisson user sampling); ELS has no banded"
                          " accounting here: run ELS with dp.mechanism gaussian")
    if mf.bands > steps:
        raise ConfigError(f"dp.banded_mf.bands={mf.bands} is larger than the {steps} planned rounds; use at most"
                          f" {steps} bands")
    if mf.bands * q > 1:
        raise ConfigError(f"dp.banded_mf.bands={mf.bands} needs an in-group sampling rate bands x q = {mf.bands} x"
                          f" {q:.4g} = {mf.bands * q:.4g} > 1; lower the bands or uls.expected_cohort")
    return cls.configured(bands=mf.bands, strategy=mf.strategy, rounds=steps)


def _choose_accountant(cfg, cls: type[NoiseMechanism], probe: dp_event.DpEvent, options: dict,
                       warnings: list[str], what: str) -> tuple[str, dict]:
    """dp.accountant if it can account for the run's release; the mechanism's own accountant if
    dp.accountant was left at its default; else a one-line error naming the ones that can."""
    name = cfg.dp.accountant
    opts = options_for(name, options)
    if make_accountant(name, **opts).supports(probe):
        return name, opts
    fallback = cls.default_accountant
    if "accountant" not in cfg.dp.model_fields_set and make_accountant(fallback).supports(probe):
        warnings.append(f"dp.accountant={name} cannot account for {what}; using {fallback}")
        return fallback, {}
    able = [n for n in accountant_names() if make_accountant(n).supports(probe)]
    raise ConfigError(f"dp.accountant={name} cannot account for {what}; use one of {able}")


def _calibrated(cls: type[NoiseMechanism], clip: float, **setting) -> NoiseMechanism:
    """cls.calibrated(clip, **setting), remembered between runs: LMO's searched parameters by the
    search's own cache; a Gaussian's sigma (an ELS mixture calibration takes minutes at small
    epsilon, and a sweep repeats it for every seed) in a JSON file per setting. A remembered sigma
    is never trusted: the caller recomputes epsilon for it and refuses one above the target."""
    import hashlib
    import json

    from fedsim.lmo_search import ResultCache
    from fedsim.rundir import atomic_write_text, cache_dir

    if cls.config_key != "noise_multiplier":
        return cls.calibrated(clip, cache=ResultCache(), **setting)
    groups = {"participation_groups": cls.participation_groups} if cls.participation_groups != 1 else {}
    key = json.dumps({"v": 1, "mechanism": cls.name, **groups, **setting}, sort_keys=True, default=str)
    path = cache_dir("calibration", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["setting"] == key:
            return cls(clip, float(saved["noise_multiplier"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mech = cls.calibrated(clip, **setting)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"setting": key, "noise_multiplier": mech.noise_multiplier}) + "\n")
    return mech


def _mechanism_for(cfg, *, clip: float, q: float, steps: int, delta: float, k: int | None,
                   dimension: int | None, options: dict, warnings: list[str]):
    """(mechanism, accountant, options, planned epsilon, target epsilon)."""
    dp = cfg.dp
    what = (f"{dp.mechanism} noise with Poisson user sampling" if k is None
            else f"the ELS mixture of {dp.mechanism} noise over Binomial(k={k}, q)")
    cls = _run_mechanism_class(cfg, q=q, steps=steps, k=k)
    errors = (ValueError, TypeError, KeyError, OSError)
    try:
        mech = cls.from_spec(clip, getattr(dp, cls.config_key), dimension)
    except errors as exc:
        raise ConfigError(f"dp.{cls.config_key}: {exc}") from None
    if mech is not None and mech.noise_std() == 0:  # dp.noise_multiplier=0: a non-private reference
        return mech, dp.accountant, options_for(dp.accountant, options), math.inf, None
    try:
        accountant, opts = _choose_accountant(cfg, cls, (mech or cls.probe(clip)).run_event(q, 1, k), options,
                                              warnings, what)
        if mech is None:
            if dp.epsilon is None:
                raise ConfigError(f"set dp.epsilon (a budget) or the noise, dp.{cls.config_key}"
                                  " (dp.noise_multiplier=0: a non-private run)")
            mech = _calibrated(cls, clip, target_epsilon=dp.epsilon, delta=delta, q=q, steps=steps, k=k,
                               accountant=accountant, dimension=dimension, **opts)
        eps = epsilon(make_accountant(accountant, **opts), mech.run_event(q, steps, k), delta)
    except errors as exc:
        raise ConfigError(f"dp: {exc}") from None
    if dp.epsilon is not None and eps > dp.epsilon:
        raise ConfigError(f"dp.{cls.config_key} ({mech.noise_label()}) gives epsilon={eps:.4g} over {steps}"
                          f" {'rounds' if k is None else f'ELS steps (k={k}, q={q:.3g})'}, above"
                          f" dp.epsilon={dp.epsilon:g}; raise the noise or leave it unset to calibrate")
    return mech, accountant, opts, eps, (dp.epsilon if dp.epsilon is not None else eps)


def _with_adaptive_clip(ac, mech: NoiseMechanism, expected_count: float) -> NoiseMechanism:
    """`mech` as it is when `ac` (dp.adaptive_clip) is None; else the adaptive-clip Gaussian mechanism with the
    same combined noise multiplier z (hence the same events and epsilon): the budget calibrated z, the
    update's noise follows from the split (`privacy/adaptive_clipping.py`). `expected_count`: the
    public denominator of the count (expected cohort or batch)."""
    if ac is None:
        return mech
    from fedsim.privacy import adaptive_clipping

    count_noise = (ac.count_noise_multiplier if ac.count_noise_multiplier is not None
                   else adaptive_clipping.default_count_noise(expected_count))
    try:
        return adaptive_clipping.AdaptiveClipGaussianMechanism.around(
            mech, target_quantile=ac.target_quantile, learning_rate=ac.learning_rate,
            count_noise_multiplier=count_noise, expected_count=expected_count)
    except ValueError as exc:
        raise ConfigError(f"dp.adaptive_clip: {exc}") from None


def plan_uls(cfg, num_users: int, dimension: int | None = None) -> Plan:
    """The ULS plan. `dimension` (trainable weights) tightens LMO accounting; None is always
    safe (a dimension-free bound)."""
    q = sampling_rate(cfg, num_users)
    delta, warnings = resolve_delta(cfg, num_users)
    ac = cfg.dp.adaptive_clip
    clip = ac.initial_clip if ac is not None and ac.initial_clip is not None else cfg.dp.clip_norm
    mech, accountant, opts, eps, target = _mechanism_for(
        cfg, clip=clip, q=q, steps=cfg.run.rounds, delta=delta, k=None, dimension=dimension,
        options={}, warnings=warnings)
    mech = _with_adaptive_clip(ac, mech, cfg.uls.expected_cohort)
    warnings += config_warnings(cfg, private=math.isfinite(eps))
    return Plan("ULS", num_users, q, delta, cfg.run.rounds, mech, accountant, opts, target, eps,
                cfg.uls.expected_cohort, tuple(warnings))


def plan_els(cfg, store, steps: int | None = None, group_bound: bool = True, dimension: int | None = None) -> Plan:
    """The ELS plan for `steps` steps (default: els.steps, else ULS's planned compute)."""
    ec, dp = cfg.els, cfg.dp
    steps = steps or ec.steps or plan_compute(cfg, store).els_steps
    users, index = kept_examples(store.train_example_counts(), ec.k, cfg.run.seed)
    # q: els.sampling_rate if set, else expected_batch / M (M, the kept-example count, is then public)
    q = ec.sampling_rate if ec.sampling_rate is not None else example_sampling_rate(ec.expected_batch, users.size, ec.k)
    delta, warnings = resolve_delta(cfg, store.num_users)
    ac = dp.adaptive_clip if ec.adaptive_clip else None
    clip = (ec.clip_norm if ec.clip_norm is not None else ac.initial_clip if ac is not None and ac.initial_clip
            is not None else dp.clip_norm)
    mech, accountant, opts, eps, target = _mechanism_for(
        cfg, clip=clip, q=q, steps=steps, delta=delta, k=ec.k, dimension=dimension,
        options={"value_discretization_interval": ec.accounting_interval}, warnings=warnings)
    mech = _with_adaptive_clip(ac, mech, ec.expected_batch)
    warnings += config_warnings(cfg, private=math.isfinite(eps))
    group = mech.group_privacy_epsilon(ec.k, q, steps, delta) if group_bound and math.isfinite(eps) else None
    return Plan("ELS", store.num_users, q, delta, steps, mech, accountant, opts, target, eps, ec.expected_batch,
                tuple(warnings), ec.k, users, index, group)


# -- matched compute (fedsim compare) -------------------------------------------------------------------


@dataclass(frozen=True)
class ComputePlan:
    """Compute is counted in per-example gradient evaluations (one forward + backward of one
    example): ULS spends q * sum_u used(u) per round, ELS its expected batch per step."""

    budget: float  # per-example gradient evaluations each method may spend
    uls_rounds: int
    uls_per_round: float  # expected: q_users * sum_u used(u)
    els_steps: int
    els_batch: float  # expected examples per ELS step

    @property
    def uls_expected(self) -> float:
        return self.uls_rounds * self.uls_per_round

    @property
    def els_expected(self) -> float:
        return self.els_steps * self.els_batch

    def as_dict(self) -> dict:
        return {**asdict(self), "uls_expected": self.uls_expected, "els_expected": self.els_expected}


def uls_users_compute(num_examples, uls):
    """Example-gradient evaluations of ULS users with `num_examples` training examples each
    (int64 array): what `training.local.train_user` does (cap, then epochs or a fixed number
    of batches)."""
    n = np.asarray(num_examples, dtype=np.int64)
    c = n if uls.max_examples_per_user is None else np.minimum(n, uls.max_examples_per_user)
    if uls.local_steps is None:
        return uls.local_epochs * c
    per_pass = np.maximum(-(-c // uls.batch_size), 1)  # batches per pass; all but the last are full
    full, rest = np.divmod(uls.local_steps, per_pass)
    return np.where(c == 0, 0, full * c + np.minimum(rest * uls.batch_size, c))


def uls_user_compute(num_examples: int, uls) -> int:
    return int(uls_users_compute([num_examples], uls)[0])


def matched_compute(budget: float | None, uls_per_round: float, planned_rounds: int, els_batch: float) -> ComputePlan:
    """The arithmetic of matched compute (separate from any store, for tests)."""
    if uls_per_round <= 0:
        raise ConfigError("ULS would compute nothing per round (no training examples)")
    if els_batch <= 0:
        raise ConfigError(f"els.expected_batch must be positive, got {els_batch!r}")
    budget = float(budget) if budget is not None else planned_rounds * uls_per_round
    return ComputePlan(budget, max(1, round(budget / uls_per_round)), uls_per_round,
                       max(1, round(budget / els_batch)), float(els_batch))


def plan_compute(cfg, store) -> ComputePlan:
    """Expected ULS compute per round, q * sum_u used(u), from the store's vectorised per-user
    training counts (no example is generated), matched to ELS steps of els.expected_batch."""
    q = sampling_rate(cfg, store.num_users)
    per_round = q * float(uls_users_compute(store.train_example_counts(), cfg.uls).sum())
    return matched_compute(cfg.compare.budget, per_round, cfg.run.rounds, cfg.els.expected_batch)
