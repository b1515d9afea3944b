"""fedsim ServerApp: thin glue between Flower's grid and fedsim's training loop.

The loop (`fedsim/loop.py`) plans nothing and knows no Flower: it asks a method for each
round's clipped sum. Here that method is the ULS strategy over Flower's grid."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.compat import set_grid_poll_interval
from fedsim.loop import train
from strategies.uls_strategy import UlsStrategy


def run_server(grid: Grid, cfg, plan, task, evalset, run_dir: Path, randomness, say=print, resume: bool = False,
               observer=None) -> dict:
    """Train `plan` with ULS over `grid`; returns the run's summary."""
    uls = cfg.uls
    present = None
    if cfg.audit.canaries:  # `fedsim audit`: excluded canaries are never sent (fedsim/auditing/canaries.py)
        from fedsim.auditing.canaries import Canaries

        canaries = Canaries.from_config(cfg, plan.num_users - cfg.audit.canaries)
        included = canaries.inclusion(randomness)
        def present(cohort):  # the sample without held-out canaries, and its real users' count
            kept = canaries.present(cohort, included)
            return kept, int((kept < canaries.num_real).sum())
    strategy = UlsStrategy(num_users=plan.num_users, dimension=task.flat.numel, sampling_rate=plan.q,
                           clip_norm=plan.mechanism.clip_norm, randomness=randomness,
                           users_per_client=uls.users_per_client, expected_cohort=uls.expected_cohort, grid=grid,
                           timeout=cfg.simulation.timeout,
                           optimizer=(uls.server_optimizer, uls.server_lr, uls.server_momentum), present=present,
                           participation_groups=plan.mechanism.participation_groups)
    return train(cfg, plan, task, evalset, strategy, run_dir, randomness, say, resume, observer=observer)


def make_server_app(outcome: dict, *args, poll_seconds: float | None = None, **kwargs) -> ServerApp:
    """A ServerApp running `run_server(grid, *args, **kwargs)`; `outcome` receives the summary or the error.
    `poll_seconds`: how often the grid looks for replies (None: Flower's 0.1 s; `fedsim.compat.poll_interval`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            set_grid_poll_interval(grid, poll_seconds)
            outcome["summary"] = run_server(grid, *args, **kwargs)
        except BaseException as exc:  # surfaced by fedsim.simulate after Flower returns
            outcome["error"] = exc

    return app


def _app_from_run_config() -> ServerApp:
    """`flwr run .`: the ServerApp reads its config path from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from clients.client_app import config_from_context
        from fedsim.data import eval_examples
        from fedsim.loop import prepare
        from fedsim.privacy.randomness import SecretRandomness
        from fedsim.rundir import create_run_dir

        cfg = config_from_context(context)
        store, task, plan = prepare(cfg, "ULS")
        randomness = SecretRandomness.for_run(cfg.dp.reproducible, cfg.run.seed)
        run_server(grid, cfg, plan, task, eval_examples(store, cfg.run.eval_examples, cfg.data.seed),
                   create_run_dir(cfg), randomness)

    return app


app = _app_from_run_config()
