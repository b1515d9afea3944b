"""The mean-estimation task (`fedsim/models/mean_estimation.py`) through the training loop:
one run of ULS or ELS with the loop's plan, ledger, budget guard, secret sampling, noise and
checkpoints (`fedsim/loop.py`), so that `fedsim audit --task mean-estimation` audits exactly the
mechanism every other run uses. (The study's sweep, `bench/mean_estimation_sweep.py`, runs many
replicas at once in plain vectorised torch instead.)

Users hold `mean_estimation.examples_per_user` vectors in R^dim from
`MeanEstimationProblem(data.num_users, ..., heterogeneity = mean_estimation.heterogeneities[0],
seed = data.seed)`; the model is one vector w (from 0), its loss the excess loss ||w - mu||^2 / 2.

ULS: a sampled user's delta is closed form, (1 - (1 - uls.client_lr)^E)(xbar_u - w), E =
uls.local_epochs, xbar_u the mean of its first uls.max_examples_per_user examples (all by
default), clipped to dp.clip_norm. ELS: the kept examples' gradients w - x, clipped to the ELS
clip norm. Both through `Release` (guard, record, noise, scale) and the server optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from fedsim.data.base import UserStore
from fedsim.models.mean_estimation import MeanEstimationProblem


class VectorUserStore(UserStore):
    """Users holding vectors: X [N, m, d]; no held-out examples (the loss is closed form)."""

    def __init__(self, examples: torch.Tensor):
        self.examples = examples

    @property
    def num_users(self) -> int:
        return int(self.examples.shape[0])

    def train_examples(self, user: int):
        return self.examples[self._check_user(user)]

    def test_examples(self, user: int):
        self._check_user(user)
        return []

    def train_example_counts(self):
        return np.full(self.num_users, self.examples.shape[1], dtype=np.int64)

    def example_counts(self):
        return self.train_example_counts()


class _Vector(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))


class MeanEstimationTask:
    """The loop's task: `flat` (one vector w) and `evaluate` (the excess loss against mu)."""

    def __init__(self, mu: torch.Tensor):
        from fedsim.models.flat import FlatParams

        self.mu, self.model = mu, _Vector(mu.numel())
        self.flat = FlatParams(self.model)

    def evaluate(self, evalset=None) -> dict[str, float]:
        """loss: the excess loss ||w - mu||^2 / 2; perplexity: exp of it (the task has no tokens)."""
        loss = float(MeanEstimationProblem.excess_loss(self.flat.get(), self.mu))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def problem_for(cfg) -> MeanEstimationProblem:
    me = cfg.mean_estimation
    return MeanEstimationProblem(cfg.data.num_users, me.examples_per_user, me.dim, me.heterogeneities[0], cfg.data.seed)


def build_vector_store(cfg) -> tuple[VectorUserStore, torch.Tensor]:
    """(store, mu) of the config's problem."""
    mu, examples = problem_for(cfg).generate()
    return VectorUserStore(examples), mu


def _clipped_rows_sum(rows: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """(sum_i min(1, C / (||r_i|| + 1e-6)) r_i, counts): the Opacus factor of every user and example
    path; counts: the rows summed (`contributions`) and those with norm <= C (`unclipped`)."""
    from fedsim.training.per_example import _norms, clip_factors

    if not rows.shape[0]:
        return rows.new_zeros(rows.shape[1]), {"contributions": 0, "unclipped": 0}
    norms = _norms(rows)
    counts = {"contributions": int(rows.shape[0]), "unclipped": int((norms <= clip).sum())}
    return clip_factors(norms, clip).to(rows.dtype) @ rows, counts


class _Canaried:
    """The canary split shared by both methods (fedsim/auditing/canaries.py)."""

    def _setup_canaries(self, store, randomness) -> None:
        from fedsim.auditing.canaries import canaries_of

        self.canaries = canaries_of(store)
        self.included = self.canaries.inclusion(randomness) if self.canaries is not None else None

    def _canary_sum(self, canary_users: np.ndarray, d: int, clip: float, sign: float) -> torch.Tensor:
        total = torch.zeros(d)
        for j in canary_users:
            total += self.canaries.clipped_update(int(j), d, clip, sign)
        return total


class MeanUls(_Canaried):
    name, key, sign = "ULS", "round", 1.0

    def __init__(self, cfg, plan, store, randomness):
        from fedsim.sampling import participation_sampler

        self.cfg, self.plan, self.store = cfg, plan, store
        self._setup_canaries(store, randomness)
        real = self.canaries.num_real if self.canaries is not None else store.num_users
        x = store.examples if isinstance(store, VectorUserStore) else store.base.examples
        used = cfg.uls.max_examples_per_user or x.shape[1]
        self.xbar, self.used = x[:real, :used].mean(1), min(used, x.shape[1])
        self.shrink = 1.0 - (1.0 - cfg.uls.client_lr) ** cfg.uls.local_epochs
        self.sampler = participation_sampler(plan.num_users, plan.q, plan.mechanism.participation_groups, randomness,
                                             "uls-cohort")
        self.optimizer = (cfg.uls.server_optimizer, cfg.uls.server_lr, cfg.uls.server_momentum)

    def clipped_sum(self, step: int, weights: torch.Tensor, clip_norm: float):
        cohort = self.sampler.sample(step)
        clip, extra = clip_norm, {}
        if self.canaries is not None:
            cohort = self.canaries.present(cohort, self.included)
            j = self.canaries.index(cohort)
            cohort, canary_users = cohort[j < 0], j[j >= 0]
        deltas = self.shrink * (self.xbar[torch.from_numpy(cohort)] - weights.view(1, -1))
        total, counts = _clipped_rows_sum(deltas, clip)
        extra.update(counts)
        if self.canaries is not None:
            total += self._canary_sum(canary_users, weights.numel(), clip, 1.0)
            extra["canaries"] = int(canary_users.size)
        return total, {"users": int(cohort.size), **extra}, int(cohort.size) * self.used * self.cfg.uls.local_epochs

    def summary(self, ledger, plan, steps: int) -> dict:
        return {"task": "mean-estimation", "trust_model": "central DP: a trusted server sees per-user clipped deltas"}


class MeanEls(_Canaried):
    name, key, sign = "ELS", "step", -1.0

    def __init__(self, cfg, plan, store, randomness):
        from fedsim.sampling import PoissonSampler

        self.cfg, self.plan, self.store = cfg, plan, store
        self._setup_canaries(store, randomness)
        self.x = store.examples if isinstance(store, VectorUserStore) else store.base.examples
        self.sampler = PoissonSampler(plan.num_examples, plan.q, randomness, "els-sample")
        self.optimizer = (cfg.els.optimizer, cfg.els.lr, cfg.els.momentum)

    def clipped_sum(self, step: int, weights: torch.Tensor, clip_norm: float):
        idx = self.sampler.sample(step)
        users, extra = self.plan.example_user[idx], {}
        clip = clip_norm
        if self.canaries is not None:
            j = self.canaries.index(users)
            canary_users = j[j >= 0]
            canary_users = canary_users[self.included[canary_users]]
            idx = idx[j < 0]
            users = self.plan.example_user[idx]
        x = self.x[torch.from_numpy(users), torch.from_numpy(self.plan.example_index[idx])]
        total, counts = _clipped_rows_sum(weights.view(1, -1) - x, clip)
        extra.update(counts)
        if self.canaries is not None:  # -c_j: the update (minus the gradient) points along +c_j
            total += self._canary_sum(canary_users, weights.numel(), clip, -1.0)
            extra["canary_examples"] = int(canary_users.size)
        return total, {"batch": int(idx.size), **extra}, int(idx.size)

    def summary(self, ledger, plan, steps: int) -> dict:
        return {"task": "mean-estimation", "trust_model": "central DP: a trusted server sees per-example clipped"
                                                          " gradients"}


def run_mean_estimation(cfg, method: str = "ULS", say=print, observer=None) -> tuple[Path, dict]:
    """One ULS or ELS run of the mean-estimation task; returns (run directory, summary)."""
    from fedsim.auditing.canaries import with_canaries
    from fedsim.errors import FedsimError
    from fedsim.loop import train
    from fedsim.plan import plan_els, plan_uls
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.rundir import create_run_dir

    method = method.upper()
    if cfg.audit.canaries and observer is None:
        raise FedsimError(f"audit.canaries={cfg.audit.canaries}: canary users are inserted only by `fedsim audit`")
    base, mu = build_vector_store(cfg)
    store = with_canaries(base, cfg)
    task = MeanEstimationTask(mu)
    plan = plan_uls(cfg, store.num_users, mu.numel()) if method == "ULS" else plan_els(cfg, store)
    # the LM tasks' pre-training advice does not apply to a vector from 0
    plan = dataclasses.replace(plan, warnings=tuple(w for w in plan.warnings if "not pretrained" not in w))
    for w in plan.warnings:
        say(f"warning: {w}")
    run_dir = create_run_dir(cfg)
    say(f"run directory: {run_dir}")
    randomness = SecretRandomness.for_run(cfg.dp.reproducible, cfg.run.seed)
    say(f"mean estimation {method}: {plan.num_users} users, d={mu.numel()}, q={plan.q:.4g}, {plan.steps}"
        f" {'rounds' if method == 'ULS' else 'steps'}, {plan.mechanism.name} noise {plan.mechanism.noise_label()},"
        f" clip {plan.mechanism.clip_norm:g}, target epsilon={plan.target_epsilon}, delta={plan.delta:.3g}")
    adaptor = (MeanUls if method == "ULS" else MeanEls)(cfg, plan, store, randomness)
    summary = train(cfg, plan, task, None, adaptor, run_dir, randomness, say, observer=observer,
                    eval_every=cfg.run.eval_every if method == "ULS" else cfg.els.eval_every)
    return run_dir, summary
