"""fedsim ServerApp: plans the privacy budget, builds the DP-FedAvg strategy, runs the
rounds, evaluates centrally on held-out examples, and writes the run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsim.checkpoint import checkpoint_if_due, load_checkpoint
from fedsim.data import build_store, eval_examples
from fedsim.errors import BudgetExceededError
from fedsim.models import build_task
from fedsim.privacy.accounting import make_accountant
from fedsim.privacy.budget import PrivacyBudget
from fedsim.privacy.ledger import PrivacyLedger
from fedsim.privacy.randomness import SecretRandomness
from fedsim.progress import RoundProgress
from fedsim.rundir import RunWriter, read_diagnostics, split_metrics_for_resume
from fedsim.training.server_opt import ServerOptimizer
from fedsim.uls import plan_uls
from strategies.dp_fedavg import DPFedAvg

log = logging.getLogger("fedsim")


def other_accountants(ledger: PrivacyLedger, delta: float, reporting: str) -> dict:
    """Epsilon of the same ledger under every accountant that supports it (bounds only;
    the run's own accountant is the one reported)."""
    from fedsim.privacy.accounting import UnsupportedEventError, accountant_names

    out = {}
    if len(ledger) == 0:
        return out
    event = ledger.total_event()
    for name in accountant_names():
        try:
            acc = make_accountant(name)
            if acc.supports(event):
                out[name] = acc.epsilon(event, delta)
        except (UnsupportedEventError, ValueError, FloatingPointError) as exc:
            out[name] = f"unavailable: {type(exc).__name__}"
    return out


def run_server(grid: Grid, cfg, run_dir: Path, say=print, resume: bool = False) -> dict:
    t_start = time.time()
    writer = RunWriter(run_dir)
    ckpt = load_checkpoint(run_dir) if resume else None
    # users, model, held-out data
    store = build_store(cfg.data)
    task = build_task(cfg, store, log=say)
    evalset = eval_examples(store, cfg.run.eval_examples, cfg.run.seed)
    # privacy plan: q, delta, calibrated mechanism
    plan = plan_uls(cfg, store.num_users, dimension=task.flat.numel)
    for w in plan.warnings:
        say(f"warning: {w}")
    ledger = PrivacyLedger(run_dir / "privacy_ledger.jsonl")
    budget = PrivacyBudget(ledger, make_accountant(plan.accountant), plan.delta, plan.target_epsilon)
    # every secret draw (cohort, noise) of this process: a fresh OS-entropy key unless reproducible
    randomness = SecretRandomness.for_run(cfg.dp.reproducible, cfg.run.seed)
    w = task.flat.get().cpu()
    server_opt = ServerOptimizer(w, cfg.uls.server_optimizer, cfg.uls.server_lr, cfg.uls.server_momentum)
    start_round, compute = 1, 0
    if ckpt is not None:
        # restore weights and server optimizer; no secret state exists to restore (the cohorts and
        # noise of later rounds come from this process's key: fresh unless reproducible)
        w = ckpt["weights"].clone()
        server_opt = ServerOptimizer(w, cfg.uls.server_optimizer, cfg.uls.server_lr, cfg.uls.server_momentum)
        server_opt.load_state_dict(ckpt["optimizer_state"])
        start_round, compute = ckpt["step"] + 1, int(ckpt.get("compute", 0))
        split_metrics_for_resume(run_dir, ckpt["step"], key="round")
        say(f"resuming after round {ckpt['step']} ({len(ledger)} releases in the ledger)")
    strategy = DPFedAvg(
        num_users=store.num_users, sampling_rate=plan.q, mechanism=plan.mechanism,
        server_optimizer=server_opt, budget=budget, randomness=randomness,
        users_per_client=cfg.uls.users_per_client, expected_cohort=cfg.uls.expected_cohort,
        replay_identical=ckpt is not None,
        crash_after_record_round=None if ckpt is not None else cfg.simulation.faults.server_crash_round,
    )
    say(f"ULS: {store.num_users} users, q={plan.q:.4g} (expected cohort {plan.q * store.num_users:.1f}),"
        f" {cfg.run.rounds} rounds, {task.flat.numel:,} trainable weights, {plan.mechanism.describe()},"
        f" target epsilon={plan.target_epsilon}, delta={plan.delta:.3g} ({plan.accountant})")
    if ckpt is None:
        before = task.evaluate(evalset)
        writer.append_metrics({"round": 0, "eval_loss": before["loss"], "eval_perplexity": before["perplexity"], "epsilon": 0.0})
    else:
        first = read_diagnostics(run_dir)[0]
        before = {"loss": first["eval_loss"], "perplexity": first["eval_perplexity"]}
    stop_reason, rounds_done = "completed planned rounds", start_round - 1
    after = before
    progress = RoundProgress(cfg.run.rounds, enabled=not cfg.simulation.verbose)
    with progress:
        for rnd in range(start_round, cfg.run.rounds + 1):
            t0 = time.time()
            # sample the cohort and send the global weights (the budget guard may stop here)
            try:
                messages = strategy.configure_train(rnd, ArrayRecord({"w": Array(w.numpy())}), ConfigRecord(), grid)
            except BudgetExceededError as exc:
                stop_reason = str(exc)
                say(f"stopping: {exc}")
                break
            # clients train their users and reply with clipped sums
            replies = grid.send_and_receive(messages, timeout=cfg.simulation.timeout)
            # sum, noise, divide by qN, server step, ledger
            arrays, metrics = strategy.aggregate_train(rnd, replies)
            w = torch.from_numpy(arrays["w"].numpy().copy())
            row = dict(metrics)
            compute += int(row["examples"])
            row["compute"] = compute
            # evaluate every eval_every rounds and at the end
            if rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds:
                task.flat.set(w)
                after = task.evaluate(evalset)
                row.update(eval_loss=after["loss"], eval_perplexity=after["perplexity"])
            row["time"] = time.time() - t0
            writer.append_metrics(row)
            rounds_done = rnd
            # atomic checkpoint (weights, optimizer; never any secret randomness)
            checkpoint_if_due(cfg, run_dir, rnd, weights=w, optimizer_state=server_opt.state_dict(),
                              extra={"compute": compute})
            progress.update(rnd, row.get("epsilon", float("nan")), row.get("eval_loss"))
    task.flat.set(w)
    after = task.evaluate(evalset)
    writer.save_weights(task.flat.state_dict(), metadata={"format": "fedsim trainable weights", "rounds": str(rounds_done)})
    eps = budget.spent()
    others = other_accountants(ledger, plan.delta, plan.accountant)
    wall = time.time() - t_start
    summary = {
        "method": "ULS", "rounds": rounds_done, "planned_rounds": cfg.run.rounds, "stop_reason": stop_reason,
        "num_users": store.num_users, "q": plan.q, "expected_cohort": cfg.uls.expected_cohort,
        "epsilon": eps, "target_epsilon": plan.target_epsilon, "delta": plan.delta, "accountant": plan.accountant,
        "mechanism": plan.mechanism.describe(), "noise_multiplier": getattr(plan.mechanism, "noise_multiplier", None),
        "noise_source": randomness.source, "randomness": randomness.describe(), "trust_model": "central DP: a trusted server sees per-user clipped deltas",
        "eval_loss_before": before["loss"], "eval_perplexity_before": before["perplexity"],
        "eval_loss_after": after["loss"], "eval_perplexity_after": after["perplexity"],
        "compute_examples": compute, "trainable_weights": task.flat.numel, "wall_time_s": wall,
        "time_per_round_s": wall / max(rounds_done, 1), "warnings": plan.warnings,
        "epsilon_by_accountant": others,
    }
    writer.write_json("summary.json", summary)
    return summary


def make_server_app(cfg, run_dir: Path, outcome: dict, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a config and run directory; `outcome` receives the summary or the error."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run_server(grid, cfg, run_dir, resume=resume)
        except BaseException as exc:  # surfaced by fedsim.simulate after Flower returns
            outcome["error"] = exc

    return app


def _app_from_run_config() -> ServerApp:
    """`flwr run .`: the ServerApp reads its config path from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from clients.client_app import config_from_context
        from fedsim.rundir import create_run_dir

        cfg = config_from_context(context)
        run_server(grid, cfg, create_run_dir(cfg))

    return app


app = _app_from_run_config()
