"""One training loop for ULS and ELS, and the one way to run or resume either
(docs/architecture.md, "One ULS round", "One ELS step"):

    plan (once) -> per round/step: guard -> the method's clipped sum -> release (record, noise,
    scale) -> optimizer step on the noisy mean -> eval, write, checkpoint

A method adaptor supplies only `clipped_sum(step, weights, clip_norm) -> (sum, diagnostics, examples)`:
ULS the Flower strategy (`strategies/uls_strategy.py`), ELS `fedsim/els.py`. `clip_norm` is the
step's C (the mechanism's: fixed, or moved after each release by adaptive clipping); the
diagnostics count the sum's `contributions` (users or examples) and the `unclipped` among them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch

from fedsim import interrupt
from fedsim.errors import BudgetExceededError, FedsimError


class Method(Protocol):
    name: str  # "ULS" or "ELS"
    key: str  # the metrics rows' step key: "round" or "step"
    sign: float  # +1: the sum is of model deltas (ULS); -1: of gradients (ELS)
    optimizer: tuple[str, float, float]  # server optimizer family, lr, momentum

    def clipped_sum(self, step: int, weights: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict, int]: ...

    def summary(self, ledger, plan, steps: int) -> dict: ...


def train(cfg, plan, task, evalset, method: Method, run_dir: Path, randomness, say=print, resume: bool = False,
          eval_every: int | None = None, observer=None) -> dict:
    """Run `plan` with `method` in `run_dir` (continuing its checkpoint when `resume`); returns the summary.
    `observer` (`fedsim audit`) sees what an adversary sees: `on_start(task, plan, randomness)` before
    the first release, `on_release(step, update)` with each released update, `on_end(task)`."""
    from fedsim.rundir import RunWriter

    scalars = None
    if cfg.run.tensorboard:
        from fedsim.tensorboard_log import TensorBoardScalars

        scalars = TensorBoardScalars(run_dir, method.key)
    try:  # a first SIGINT/SIGTERM now stops after the round/step (fedsim/interrupt.py)
        # an audit is never resumed (a secure resume would draw new inclusion coins): no resume hint
        import contextlib

        resumable = interrupt.resumable(f"fedsim run --resume {run_dir}") if observer is None else contextlib.nullcontext()
        with resumable, interrupt.deferred():
            return _train(cfg, plan, task, evalset, method, run_dir, randomness, say, resume, eval_every,
                          RunWriter(run_dir, scalars), observer)
    finally:
        if scalars is not None:
            scalars.close()


def _train(cfg, plan, task, evalset, method: Method, run_dir: Path, randomness, say, resume: bool,
           eval_every: int | None, writer, observer=None) -> dict:
    from fedsim.checkpoint import checkpoint_if_due, load_checkpoint, save_checkpoint
    from fedsim.privacy.budget import PrivacyBudget
    from fedsim.privacy.ledger import PrivacyLedger
    from fedsim.privacy.release import Release, kill_after_recording
    from fedsim.progress import RoundProgress
    from fedsim.rundir import read_diagnostics, split_metrics_for_resume
    from fedsim.training.server_opt import ServerOptimizer

    t_start = time.time()
    ckpt = load_checkpoint(run_dir) if resume else None
    eval_every = (ckpt or {}).get("eval_every") or eval_every or cfg.run.eval_every
    # the ledger is the durable record; the budget's live accountant is rebuilt from it once
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    budget = PrivacyBudget(plan.make_accountant, plan.delta, plan.target_epsilon, ledger.events(), ledger.groups(),
                           ledger.partitions())
    release = Release(mechanism=plan.mechanism, event=plan.event, ledger=ledger, budget=budget, randomness=randomness,
                      purpose=method.name.lower(), denominator=plan.denominator, resumed=ckpt is not None,
                      after_record=kill_after_recording(None if ckpt else cfg.simulation.faults.server_crash_round))
    start, compute = 1, 0
    # the mechanism's public state (an adaptive clip norm): the checkpoint's, or the plan's start
    plan.mechanism.load_state_dict(ckpt.get("mechanism_state") if ckpt is not None else None)
    if ckpt is not None:  # weights, optimizer, public RNG; no secret state exists to restore
        task.flat.set(ckpt["weights"])
        start, compute = ckpt["step"] + 1, int(ckpt.get("compute", 0))
        if "torch" in ckpt["rng_states"]:  # torch's global RNG: dropout on the server's model (ELS)
            torch.set_rng_state(ckpt["rng_states"]["torch"])
        split_metrics_for_resume(run_dir, ckpt["step"], key=method.key)
        first = read_diagnostics(run_dir)[0]
        before = {"loss": first["eval_loss"], "perplexity": first["eval_perplexity"]}
        say(f"resuming after {method.key} {ckpt['step']} ({len(ledger)} releases in the ledger)")
    else:
        # the plan's public fields, so that `fedsim account RUN_DIR` can recompute epsilon spent so
        # far from the ledger even if the run never writes summary.json
        writer.write_json("plan.json", plan.describe())
        before = task.evaluate(evalset)
        writer.append_metrics({method.key: 0, "compute": 0, "eval_loss": before["loss"],
                               "eval_perplexity": before["perplexity"], "epsilon": 0.0})
    opt = ServerOptimizer(task.flat.get(), *method.optimizer)

    def checkpoint(step: int, always: bool = False) -> int | None:
        """A checkpoint at `step` if run.checkpoint_every divides it (or `always`); the step written or None."""
        state = {"weights": task.flat.get(), "optimizer_state": opt.state_dict(),
                 "extra": {"method": method.name, "compute": compute, "eval_every": eval_every,
                           "mechanism_state": plan.mechanism.state_dict()},
                 "rng_states": {"torch": torch.get_rng_state()}}
        if always:
            save_checkpoint(run_dir, step=step, **state)
            return step
        return step if checkpoint_if_due(cfg, run_dir, step, **state) else None

    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer_state"])
        saved = ckpt["step"]
    else:  # a checkpoint before the first release: a run interrupted in its first round/step resumes too
        saved = checkpoint(0)
    if observer is not None:
        observer.on_start(task=task, plan=plan, randomness=randomness)
    stop_reason, done, after = f"completed planned {method.key}s", start - 1, before
    diverged = None  # a warning, once
    with RoundProgress(plan.steps, label=f"{method.name} {method.key}s", enabled=not cfg.simulation.verbose,
                       say=say) as bar:
        for step in range(start, plan.steps + 1):
            if interrupt.requested():  # Ctrl-C / SIGTERM: stop between rounds/steps, resumably
                if saved != done:  # a checkpoint at the stop, whatever run.checkpoint_every says
                    saved = checkpoint(done, always=True)
                raise interrupt.RunInterrupted(method.key, done)
            t0 = time.time()
            try:
                eps = release.guard(step)  # never start a release that would overspend
            except BudgetExceededError as exc:
                stop_reason = str(exc)
                say(f"stopping: {exc}")
                break
            total, diagnostics, examples = method.clipped_sum(step, opt.weights, plan.mechanism.clip_norm)
            signal_norm = float(torch.linalg.vector_norm(total))  # a diagnostic: the unnoised sum
            noisy_mean, noise_metrics = release.release(step, total, diagnostics["unclipped"],
                                                        diagnostics["contributions"])
            update = noisy_mean.mul_(method.sign).to(opt.weights.device)
            if observer is not None:
                observer.on_release(step, update)
            task.flat.set(opt.step(update))
            compute += examples
            row = {  # released (covered by the guarantee): public plan values and the noisy update
                method.key: step, "epsilon": eps, "q": plan.q, plan.denominator_name: plan.denominator,
                "update_norm": float(torch.linalg.vector_norm(update)), **noise_metrics,
                # simulation diagnostics (from unnoised user data): diagnostics.jsonl
                **diagnostics, "compute": compute, "signal_norm": signal_norm}
            if step % eval_every == 0 or step == plan.steps:
                after = task.evaluate(evalset)
                row.update(eval_loss=after["loss"], eval_perplexity=after["perplexity"])
            row["time"] = time.time() - t0
            writer.append_metrics(row)
            done = step
            saved = checkpoint(step) or saved
            bar.update(step, eps, row.get("eval_loss"), row["time"])
            if "eval_loss" in row and not diverged and _diverged(before["loss"], row["eval_loss"]):
                diverged = (f"eval loss diverged: {row['eval_loss']:.4g} after {method.key} {step}"
                            f" ({before['loss']:.4g} before training); lower the learning rates or the clip norm")
                say(f"warning: {diverged}")
    if done and (done != plan.steps or after is before):
        after = task.evaluate(evalset)
    if observer is not None:
        observer.on_end(task)
    writer.save_weights(task.flat.state_dict(), metadata={"format": "fedsim trainable weights", "steps": str(done)})
    wall = time.time() - t_start
    summary = {
        **plan.describe(), "steps": done, "stop_reason": stop_reason, "epsilon": budget.spent(),
        "noise_source": randomness.source, "randomness": randomness.describe(),
        "eval_loss_before": before["loss"], "eval_perplexity_before": before["perplexity"],
        "eval_loss_after": after["loss"], "eval_perplexity_after": after["perplexity"],
        "compute_examples": compute, "trainable_weights": task.flat.numel, "wall_time_s": wall,
        "time_per_step_s": wall / max(done, 1), **method.summary(ledger, plan, done),
        **({"mechanism_state": state} if (state := plan.mechanism.state_dict()) else {}),
        "eval_set": "held-out examples of the training users (a simulation diagnostic)",
        "warnings": list(plan.warnings) + ([diverged] if diverged else [])}
    from fedsim.privacy import sabotage

    if sabotage.active_kinds():  # the audit's self-test: this run's mechanism was broken on purpose
        summary["sabotage"] = sabotage.active_kinds()
    writer.write_json("summary.json", summary)
    return summary


# -- running and resuming ---------------------------------------------------------------------------


def prepare(cfg, method: str, say=print, plan=None, resume_dir: Path | None = None):
    """(store, task, plan): every input is checked, the model built and the plan made before any
    file is written or process started."""
    from fedsim.data import build_store, report_notes
    from fedsim.models import build_task
    from fedsim.models.causal_lm import check_model_source
    from fedsim.simulate import check_devices

    if cfg.run.tensorboard:
        from fedsim.tensorboard_log import check_tensorboard

        check_tensorboard()
    from fedsim.auditing.canaries import with_canaries

    store = with_canaries(build_store(cfg.data), cfg)  # `fedsim audit`: canary users appended
    for line in report_notes(store.data_report()):  # what the data lost on the way in, once at the start
        say(f"note: {line}")
    check_model_source(cfg)
    check_devices(cfg)
    if resume_dir is not None:
        from fedsim.checkpoint import load_checkpoint

        load_checkpoint(resume_dir)  # a missing or corrupt checkpoint fails here
    task = build_task(cfg, store, log=say)
    if plan is None:
        from fedsim.plan import plan_els, plan_uls

        plan = plan_uls(cfg, store.num_users, task.flat.numel) if method == "ULS" else plan_els(cfg, store)
    if plan.data_report is None:  # summary.json's data_report (plan.describe())
        import dataclasses

        plan = dataclasses.replace(plan, data_report=store.data_report())
    for w in plan.warnings:
        say(f"warning: {w}")
    return store, task, plan


def run(cfg, method: str = "ULS", say=print, *, plan=None, run_dir: Path | None = None, resume: bool = False,
        eval_every: int | None = None, observer=None) -> tuple[Path, dict]:
    """Run ULS (Flower) or ELS (centralized) for the config; returns (run directory, summary).
    `resume=True` continues `run_dir` from its last checkpoint (its ledger is never reset)."""
    from fedsim.data import eval_examples
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.rundir import create_run_dir
    from fedsim.simulate import quiet_logs

    method = method.upper()
    if observer is None:  # canaries and the sabotage switches belong to `fedsim audit` alone
        from fedsim.auditing.canaries import refuse_canaries
        from fedsim.privacy import sabotage

        refuse_canaries(cfg, "run, compare or sweep")
        if sabotage.active_kinds():
            raise FedsimError(f"the sabotage switches {sabotage.active_kinds()} are for `fedsim audit`'s self-test only")
    quiet_logs(cfg.simulation.verbose)  # before the model is built: library notices are not for the user
    # One intra-op thread unless asked: the tiny per-user batches gain nothing from more, and
    # OpenMP threads spinning beside Ray actors (which Ray pins to 1 thread) slowed rounds ~50x.
    torch.set_num_threads(cfg.run.threads or 1)
    store, task, plan = prepare(cfg, method, say, plan, run_dir if resume else None)
    run_dir = Path(run_dir) if run_dir is not None else create_run_dir(cfg)
    say(f"run directory: {run_dir}")
    from fedsim.auditing.canaries import real_users

    evalset = eval_examples(real_users(store), cfg.run.eval_examples, cfg.data.seed)  # never a canary's
    # every secret draw (sample, noise) of this process: a fresh OS-entropy key unless reproducible
    randomness = SecretRandomness.for_run(cfg.dp.reproducible, cfg.run.seed)
    say(f"{method}: {plan.num_users} users, q={plan.q:.4g}, {plan.denominator_name.replace('_', ' ')}"
        f" {plan.denominator:g}, {plan.steps} {'rounds' if method == 'ULS' else 'steps'},"
        f" {task.flat.numel:,} trainable weights, {plan.mechanism.name} noise {plan.mechanism.noise_label()},"
        f" clip {plan.mechanism.clip_norm:g}, target epsilon={plan.target_epsilon},"
        f" delta={plan.delta:.3g} ({plan.accountant})")
    if method == "ULS":
        from fedsim.simulate import run_flower

        summary = run_flower(cfg, plan, task, evalset, run_dir, randomness, say, resume, observer=observer)
    else:
        from fedsim.els import ElsMethod

        els = ElsMethod(cfg, plan, store, task, randomness)
        try:
            summary = train(cfg, plan, task, evalset, els, run_dir, randomness, say, resume,
                            eval_every or cfg.els.eval_every, observer=observer)
        finally:
            els.close()
    return run_dir, summary


def resume(run_dir: str | Path, say=print) -> tuple[Path, dict]:
    """Continue a ULS or ELS run from its last checkpoint, with the config it was started with."""
    from fedsim.checkpoint import checkpoint_method
    from fedsim.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FedsimError(f"{run_dir} is not a fedsim run directory (no config.yaml)")
    if (run_dir / "summary.json").is_file():
        raise FedsimError(f"{run_dir} already finished (summary.json exists); nothing to resume")
    return run(load_config(run_dir / "config.yaml"), checkpoint_method(run_dir), say, run_dir=run_dir, resume=True)


def run_uls(cfg, say=print, **options) -> tuple[Path, dict]:  # DP-FedAvg on Flower
    return run(cfg, "ULS", say, **options)


def run_els(cfg, say=print, **options) -> tuple[Path, dict]:  # the centralized ELS baseline
    return run(cfg, "ELS", say, **options)


def _diverged(before: float, loss: float) -> bool:
    """Non-finite, or 50% (and at least 0.5 nats) above the loss before training."""
    import math

    return not math.isfinite(loss) or loss > before + max(0.5, 0.5 * abs(before))
