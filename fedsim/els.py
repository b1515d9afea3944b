"""ELS: the centralized DP-SGD baseline with example-level sampling (docs/architecture.md, "One ELS step").

Each user keeps at most k of its training examples (a seeded choice, `cap_examples`).
One step:
  1. the budget guard checks that one more release fits (it stops the run otherwise);
  2. every kept example joins the batch independently with probability q (Poisson,
     drawn from the secret randomness source, `privacy/randomness.py`; the batch may be
     empty, and then only noise is released);
  3. per-example gradients are clipped to C and summed (`training/per_example.py`); an
     example whose gradient is not finite contributes zero (dropped and counted);
  4. the release is written to the ledger, then the mechanism adds its noise to the sum;
  5. the noisy sum is divided by the *expected* batch size q M (a fixed denominator
     keeps the sensitivity C / (q M); Opacus does the same) and the optimizer steps.
The user-level (epsilon, delta) of the run is the Binomial(k, q) mixture-of-Gaussians
PLD composed over the steps (`privacy/els_accounting.py`), the tight accountant of
Charles et al. 2024 (arXiv 2407.07737); the group-privacy bound is reported beside it.

What the server sees: per-example clipped gradients (central DP, trusted server).
Same task, model, evaluation set and optimizer family (`ServerOptimizer`) as ULS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedsim.errors import BudgetExceededError, ConfigError
from fedsim.privacy.accounting import check_delta
from fedsim.privacy.mechanisms import GaussianMechanism, NoiseMechanism


@dataclass
class ElsPlan:
    num_users: int
    k: int
    example_user: np.ndarray  # [M] owner of each kept example
    example_index: np.ndarray  # [M] its index in the owner's training examples
    q: float  # example sampling rate
    expected_batch: float  # q M
    steps: int
    delta: float
    mechanism: NoiseMechanism
    target_epsilon: float | None  # None: non-private
    planned_epsilon: float  # tight user-level epsilon after all planned steps
    group_epsilon: float | None  # the group-privacy bound at the same delta (None if not computed)
    accounting_interval: float
    warnings: list[str] = field(default_factory=list)
    accountant: object = None  # the ElsPldAccountant that planned it (its cached PLD serves the budget guard)

    def accountant_summary(self) -> dict:
        """summary.json's accountant fields: a registered name (+ options) `fedsim account` can use."""
        if getattr(self.accountant, "name", None) == "lmo_faithful":
            return {"accountant": "lmo_faithful", "accountant_description":
                    "lmo_faithful: Binomial(k, q) mixture of LMO releases (Minkowski/convexity over the mixture,"
                    " Poisson-subsampled RDP, composed, CKS conversion)"}
        return {"accountant": "els_pld", "accountant_options": {"value_discretization_interval": self.accounting_interval},
                "accountant_description": f"pld mixture-of-Gaussians over Binomial(k, q) (interval {self.accounting_interval:g})"}

    @property
    def num_examples(self) -> int:
        return int(self.example_user.size)

    def texts(self, store, idx: np.ndarray) -> list:
        return [store.train_examples(int(self.example_user[i]))[int(self.example_index[i])] for i in idx]


def kept_examples(store, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, index) of every kept example: at most k per user, a seeded choice per user."""
    from fedsim.training.local import cap_examples

    users, index = [], []
    for u in range(store.num_users):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 17) * 10_000_019 + u)
        keep = cap_examples(range(len(store.train_examples(u))), k, gen)
        users.extend([u] * len(keep))
        index.extend(keep)
    return np.asarray(users, dtype=np.int64), np.asarray(index, dtype=np.int64)


def sampling_rate(expected_batch: float, num_examples: int, k: int) -> float:
    if num_examples < 1:
        raise ConfigError("ELS has no training examples to sample from")
    q = expected_batch / num_examples
    if q > 1:
        raise ConfigError(f"els.expected_batch={expected_batch:g} is larger than the data: {num_examples} examples are"
                          f" kept with els.k={k} (q={q:.3g} > 1); lower els.expected_batch or raise els.k")
    return q


def plan_els(cfg, store, steps: int | None = None, group_bound: bool = True) -> ElsPlan:
    """Examples, sampling rate, delta and the calibrated mechanism for `steps` ELS steps."""
    from fedsim.privacy.els_accounting import (
        ElsPldAccountant,
        calibrate_els_noise,
        check_group_size,
        els_event,
        group_privacy_epsilon,
    )
    from fedsim.uls import resolve_delta

    ec, dp = cfg.els, cfg.dp
    check_group_size(ec.k, "els.k")
    steps = steps or ec.steps
    if steps is None:
        from fedsim.compare import plan_compute

        steps = plan_compute(cfg, store).els_steps
    users, index = kept_examples(store, ec.k, cfg.run.seed)
    # q: els.sampling_rate if set, else expected_batch / M (M, the kept-example count, is then public)
    q = ec.sampling_rate if ec.sampling_rate is not None else sampling_rate(ec.expected_batch, users.size, ec.k)
    delta, warnings = resolve_delta(cfg, store.num_users)
    check_delta(delta, "dp.delta")
    clip = ec.clip_norm if ec.clip_norm is not None else dp.clip_norm
    interval = ec.accounting_interval
    if dp.mechanism == "lmo":
        # LMO noise: the Binomial(k, q) mixture accounted by lmo_faithful (privacy/lmo.py,
        # `mixture_subsampled_rdp`); dimension-free bound (the model is not built yet)
        from fedsim.privacy.lmo import LmoFaithfulAccountant
        from fedsim.privacy.lmo_wiring import lmo_mechanism_for

        mech, eps = lmo_mechanism_for(cfg, delta=delta, q=q, steps=steps, dimension=None, clip_norm=clip, k=ec.k,
                                      warnings=warnings)
        target = dp.epsilon if dp.epsilon is not None else eps
        return ElsPlan(store.num_users, ec.k, users, index, q, ec.expected_batch, steps, delta, mech, target, eps,
                       None, interval, warnings, LmoFaithfulAccountant())
    acc = ElsPldAccountant(interval)

    def finish(sigma: float, target: float | None, eps: float) -> ElsPlan:
        group = None
        if group_bound and math.isfinite(eps) and sigma > 0:
            group = group_privacy_epsilon(sigma, ec.k, q, steps, delta).epsilon
        return ElsPlan(store.num_users, ec.k, users, index, q, ec.expected_batch, steps, delta,
                       GaussianMechanism(clip, sigma), target, eps, group, interval, warnings, acc)

    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
        if sigma == 0:
            return finish(0.0, None, math.inf)
        eps = acc.epsilon(els_event(sigma, ec.k, q, steps), delta)
        if dp.epsilon is not None and eps > dp.epsilon:
            raise ConfigError(f"dp.noise_multiplier={sigma:g} gives user-level epsilon={eps:.4g} over {steps} ELS steps"
                              f" (k={ec.k}, q={q:.3g}), above dp.epsilon={dp.epsilon:g}")
        return finish(sigma, dp.epsilon if dp.epsilon is not None else eps, eps)
    if dp.epsilon is None:
        raise ConfigError("set dp.epsilon (a budget) or dp.noise_multiplier (0 for a non-private run)")
    sigma = calibrate_els_noise(ec.k, q, steps, dp.epsilon, delta, interval, accountant=acc)
    return finish(sigma, dp.epsilon, acc.epsilon(els_event(sigma, ec.k, q, steps), delta))


def _load_els_checkpoint(run_dir, load_checkpoint) -> dict:
    from fedsim.errors import FedsimError

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FedsimError(f"{run_dir} is not a fedsim run directory (no config.yaml)")
    if (run_dir / "summary.json").is_file():
        raise FedsimError(f"{run_dir} already finished (summary.json exists); nothing to resume")
    ckpt = load_checkpoint(run_dir)
    if ckpt.get("method") != "ELS":
        raise FedsimError(f"{run_dir / 'checkpoint.json'} is not an ELS checkpoint")
    return ckpt


def clipped_sum(clipper, task, texts: list, clip_norm: float, micro_batch: int):
    """flat_grad <- sum of clipped per-example gradients over `texts`, in micro-batches."""
    from fedsim.training.per_example import ClipResult

    if len(texts) <= micro_batch:
        return clipper.clip_and_accumulate(task.batch(texts), clip_norm)
    total = torch.zeros_like(task.flat.flat_grad)
    parts = []
    for i in range(0, len(texts), micro_batch):
        parts.append(clipper.clip_and_accumulate(task.batch(texts[i : i + micro_batch]), clip_norm))
        total.add_(task.flat.flat_grad)
    task.flat.flat_grad.copy_(total)
    return ClipResult(torch.cat([p.norms for p in parts]), torch.cat([p.losses for p in parts]),
                      sum(p.dropped for p in parts))


def resume_els(run_dir: str | Path, say=print) -> tuple[Path, dict]:
    """Continue an ELS run from its last checkpoint, with the config it was started with."""
    from fedsim.config import load_config

    run_dir = Path(run_dir)
    return run_els(load_config(run_dir / "config.yaml"), say, run_dir=run_dir, resume=True)


def run_els(cfg, say=print, plan: ElsPlan | None = None, run_dir: Path | None = None,
            eval_every: int | None = None, resume: bool = False) -> tuple[Path, dict]:
    """Run ELS for the planned steps (or until the budget stops it); returns (run directory, summary).

    ``resume=True`` continues `run_dir` from its checkpoint (weights, optimizer, step and
    compute counters, torch's global RNG for dropout). The ledger is never reset: a step
    recorded before the crash is counted; its replay is the identical release only in
    reproducible mode (the same key re-draws the same sample and noise). A secure resume
    has a fresh key: the re-done step is a new release and is counted again."""
    from fedsim.checkpoint import checkpoint_if_due, load_checkpoint
    from fedsim.data import build_store, eval_examples
    from fedsim.models import build_task
    from fedsim.privacy.budget import PrivacyBudget
    from fedsim.privacy.els_accounting import ElsPldAccountant, els_step_event
    from fedsim.privacy.ledger import PrivacyLedger
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.privacy.release import Release, kill_after_recording
    from fedsim.progress import RoundProgress
    from fedsim.rundir import RunWriter, create_run_dir, read_diagnostics, split_metrics_for_resume
    from fedsim.sampling import PoissonSampler
    from fedsim.training.per_example import make_clipper
    from fedsim.training.server_opt import ServerOptimizer

    t_start = time.time()
    torch.set_num_threads(cfg.run.threads or 1)  # as ULS: one intra-op thread unless asked (shared CPUs)
    # users, privacy plan (fails on bad input before anything is written), run directory
    ckpt = None
    if resume:
        ckpt = _load_els_checkpoint(run_dir, load_checkpoint)
        eval_every = eval_every or ckpt.get("eval_every")
    store = build_store(cfg.data)
    plan = plan or plan_els(cfg, store)
    for w in plan.warnings:
        say(f"warning: {w}")
    run_dir = Path(run_dir) if run_dir is not None else create_run_dir(cfg)
    writer = RunWriter(run_dir)
    # model, held-out data (the same examples ULS evaluates on), per-example gradients
    task = build_task(cfg, store, log=say)
    evalset = eval_examples(store, cfg.run.eval_examples, cfg.run.seed)
    clipper = make_clipper(task, cfg.els.per_example)
    # ledger, budget guard, noise, example sampler, optimizer
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    budget = PrivacyBudget(ledger, plan.accountant or ElsPldAccountant(plan.accounting_interval), plan.delta,
                           plan.target_epsilon)
    # every secret draw (example sample, noise) of this process: a fresh OS-entropy key unless reproducible
    randomness = SecretRandomness.for_run(cfg.dp.reproducible, cfg.run.seed)
    sampler = PoissonSampler(plan.num_examples, plan.q, randomness, "els-sample")
    opt = ServerOptimizer(task.flat.get(), cfg.els.optimizer, cfg.els.lr, cfg.els.momentum)
    step_event = els_step_event(plan.mechanism.dp_event(), plan.k, plan.q)
    clip = plan.mechanism.clip_norm
    eval_every = eval_every or cfg.els.eval_every
    say(f"ELS: {plan.num_users} users, k={plan.k} ({plan.num_examples} examples kept), q={plan.q:.4g} (expected batch"
        f" {plan.expected_batch:g}), {plan.steps} steps, {task.flat.numel:,} trainable weights, per-example:"
        f" {clipper.name}, {plan.mechanism.describe()}, target user-level epsilon={plan.target_epsilon}, delta={plan.delta:.3g}")
    stop_reason, steps_done, compute, eps, start = "completed planned steps", 0, 0, 0.0, 1
    if ckpt is None:
        before = task.evaluate(evalset)
        writer.append_metrics({"step": 0, "compute": 0, "eval_loss": before["loss"],
                               "eval_perplexity": before["perplexity"], "epsilon": 0.0})
    else:
        # restore weights and optimizer; no secret state exists to restore (samples and noise of
        # later steps come from this process's key: fresh unless reproducible)
        task.flat.set(ckpt["weights"].to(task.flat.flat.device, task.flat.flat.dtype))
        opt = ServerOptimizer(task.flat.get(), cfg.els.optimizer, cfg.els.lr, cfg.els.momentum)
        opt.load_state_dict(ckpt["optimizer_state"])
        start, steps_done, compute = ckpt["step"] + 1, ckpt["step"], int(ckpt.get("compute", 0))
        if "torch" in ckpt.get("rng_states", {}):  # torch's global RNG: dropout (LoRA / local models) in train mode
            torch.set_rng_state(ckpt["rng_states"]["torch"])
        split_metrics_for_resume(run_dir, ckpt["step"], key="step")
        first = read_diagnostics(run_dir)[0]
        before = {"loss": first["eval_loss"], "perplexity": first["eval_perplexity"]}
        say(f"resuming after step {ckpt['step']} ({len(ledger)} releases in the ledger)")
    after = before
    # guard -> record -> noise -> scale (fedsim/privacy/release.py); divided by the expected batch
    release = Release(mechanism=plan.mechanism, event=step_event, budget=budget, randomness=randomness, purpose="els",
                      denominator=plan.expected_batch, resumed=ckpt is not None,
                      after_record=kill_after_recording(None if ckpt is not None else
                                                        cfg.simulation.faults.server_crash_round))
    progress = RoundProgress(plan.steps, label="ELS steps")
    with progress:
        for step in range(start, plan.steps + 1):
            t0 = time.time()
            # budget guard: never start a release that would overspend
            try:
                eps = release.guard(step)
            except BudgetExceededError as exc:
                stop_reason = str(exc)
                say(f"stopping: {exc}")
                break
            # secret Poisson sample of examples (possibly empty)
            texts = plan.texts(store, sampler.sample(step))
            # forward / backward: sum of per-example gradients clipped to C (zero if the batch is empty)
            res = clipped_sum(clipper, task, texts, clip, cfg.els.micro_batch)
            signal_norm = float(torch.linalg.vector_norm(task.flat.flat_grad))  # a diagnostic: the unnoised sum
            # record (the event only), noise, divide by the expected batch; the optimizer steps on
            # the pseudo-delta -gradient estimate
            mean_grad, noise_metrics = release.release(step, task.flat.flat_grad)
            update = mean_grad.neg_()
            task.flat.set(opt.step(update))
            compute += len(texts)
            finite = res.norms[torch.isfinite(res.norms)]
            row = {
                # released (covered by the guarantee): public plan values and the noisy update
                "step": step, "epsilon": eps, "q": plan.q, "expected_batch": plan.expected_batch,
                "update_norm": float(torch.linalg.vector_norm(update)), **noise_metrics,
                # simulation diagnostics (computed from unnoised user data; diagnostics.jsonl)
                "batch": len(texts), "compute": compute, "dropped_examples": res.dropped,
                "train_loss": float(res.losses[torch.isfinite(res.losses)].mean()) if finite.numel() else None,
                "clipped_frac": res.clipped_fraction(clip),
                "grad_norm_median": float(finite.median()) if finite.numel() else None, "signal_norm": signal_norm}
            # evaluate every eval_every steps and at the end
            if step % eval_every == 0 or step == plan.steps:
                after = task.evaluate(evalset)
                row.update(eval_loss=after["loss"], eval_perplexity=after["perplexity"])
            # log
            row["time"] = time.time() - t0
            writer.append_metrics(row)
            steps_done = step
            # atomic checkpoint (weights, optimizer, dropout RNG; never any secret randomness)
            checkpoint_if_due(cfg, run_dir, step, weights=task.flat.get(), optimizer_state=opt.state_dict(),
                              extra={"method": "ELS", "compute": compute, "eval_every": eval_every},
                              rng_states={"torch": torch.get_rng_state()})
            progress.update(step, eps, row.get("eval_loss"))
    clipper.close()
    if steps_done and (steps_done != plan.steps or after is before):
        after = task.evaluate(evalset)
    writer.save_weights(task.flat.state_dict(), metadata={"format": "fedsim trainable weights", "steps": str(steps_done)})
    eps = budget.spent()
    wall = time.time() - t_start
    summary = {
        "method": "ELS", "steps": steps_done, "planned_steps": plan.steps, "stop_reason": stop_reason,
        "num_users": plan.num_users, "k": plan.k, "num_examples": plan.num_examples, "q": plan.q,
        "expected_batch": plan.expected_batch, "epsilon": eps, "target_epsilon": plan.target_epsilon,
        "delta": plan.delta, **plan.accountant_summary(),
        "group_privacy_epsilon": plan.group_epsilon, "mechanism": plan.mechanism.describe(),
        "noise_multiplier": getattr(plan.mechanism, "noise_multiplier", None), "noise_source": randomness.source,
        "randomness": randomness.describe(),
        "per_example": clipper.name, "optimizer": cfg.els.optimizer, "lr": cfg.els.lr,
        "trust_model": "central DP: a trusted server sees per-example clipped gradients",
        "eval_loss_before": before["loss"], "eval_perplexity_before": before["perplexity"],
        "eval_loss_after": after["loss"], "eval_perplexity_after": after["perplexity"],
        "compute_examples": compute, "expected_compute": plan.expected_batch * steps_done,
        "trainable_weights": task.flat.numel, "wall_time_s": wall, "time_per_step_s": wall / max(steps_done, 1),
        "warnings": plan.warnings,
    }
    writer.write_json("summary.json", summary)
    return run_dir, summary
