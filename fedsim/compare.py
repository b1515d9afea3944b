"""`fedsim compare CONFIG [--set k=v]`: ULS vs ELS at the same (epsilon, delta) and compute.

Compute is counted in per-example gradient evaluations: ULS expects q * sum_u used(u) per
round (`fedsim.plan.uls_users_compute`), ELS its expected batch per step. `compare.budget`
fixes the total (None: ULS's planned compute over run.rounds); each method gets as many
rounds/steps as fit, and is calibrated to dp.epsilon at the same delta under its own
accountant. The result: one table, a comparison directory with both run directories,
`compare.json` and `compare.png` (eval loss vs compute spent).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fedsim.errors import ConfigError, FedsimError
from fedsim.plan import ComputePlan


def _curve(run_dir: Path) -> list[tuple[float, float]]:
    from fedsim.rundir import read_diagnostics

    # a simulation diagnostic (eval on the private users' held-out text, realised compute)
    return [(float(r.get("compute", 0)), float(r["eval_loss"])) for r in read_diagnostics(run_dir)
            if r.get("eval_loss") is not None]


def plot_curves(path: Path, curves: dict[str, list[tuple[float, float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("compute spent (per-example gradient evaluations)")
    ax.set_ylabel("eval loss (held-out users)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def print_table(uls: dict, els: dict, cp: ComputePlan) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ULS vs ELS, same (epsilon, delta), compute budget {cp.budget:,.0f} example gradients")
    for col in ("method", "eps (target)", "delta", "noise", "shape", "compute (plan)", "eval loss", "ppl", "time"):
        t.add_column(col)
    for s in (uls, els):
        shape = (f"{s['steps']} rounds x {s['expected_cohort']:.0f} users" if s["method"] == "ULS"
                 else f"{s['steps']} steps x {s['expected_batch']:g} ex, k={s['k']}")
        planned = cp.uls_expected if s["method"] == "ULS" else cp.els_expected
        t.add_row(s["method"], f"{_fmt(s['epsilon'])} ({_fmt(s.get('target_epsilon'))})", f"{s['delta']:.2g}",
                  s.get("noise", f"sigma={_fmt(s.get('noise_multiplier'))}"), shape, f"{s['compute_examples']:,} ({planned:,.0f})",
                  f"{s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}", f"{s['eval_perplexity_after']:.3f}",
                  f"{s['wall_time_s']:.0f}s")
    Console().print(t)
    g = els.get("group_privacy_epsilon")
    if g is not None:
        print(f"ELS user-level epsilon: tight (mixture PLD) {_fmt(els['epsilon'])} vs group privacy {_fmt(g)}"
              f" (k={els['k']}, same sigma and delta)")


def _run_or_resume(run_dir: Path, resuming: bool, start, say) -> tuple[Path, dict]:
    """One method of a comparison: `start()` it, or, when resuming and its run directory
    exists, keep it if it finished, else continue it from its checkpoint (its ledger is never reset)."""
    from fedsim.loop import resume

    if not (resuming and run_dir.is_dir()):
        return start()
    summary = run_dir / "summary.json"
    if summary.is_file():
        say(f"{run_dir.name}: finished before the interruption; kept")
        return run_dir, json.loads(summary.read_text(encoding="utf-8"))
    say(f"{run_dir.name}: resuming from its last checkpoint")
    return resume(run_dir, say=say)


def _with(cfg, section: str, **values):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def run_compare(cfg, say=print, resume_dir: Path | None = None) -> tuple[Path, dict]:
    """ULS then ELS at matched (epsilon, delta) and compute. `resume_dir`: an interrupted
    comparison directory (its config.yaml is `cfg`); a finished method is kept, an interrupted
    one resumes from its checkpoint, one not yet started runs."""
    from fedsim.data import build_store
    from fedsim.loop import run
    from fedsim.models import build_task
    from fedsim.plan import mechanism_class, plan_compute, plan_els, plan_uls
    from fedsim.rundir import RunWriter, create_run_dir

    t0 = time.time()
    if cfg.dp.noise_multiplier is not None:  # each method gets its own sigma for the shared budget
        say(f"note: dp.noise_multiplier={cfg.dp.noise_multiplier:g} is ignored; both methods are calibrated to dp.epsilon")
        cfg = _with(cfg, "dp", noise_multiplier=None)
    store = build_store(cfg.data)
    cp = plan_compute(cfg, store)
    out = Path(resume_dir) if resume_dir is not None else None
    uls_cfg = _with(cfg, "run", rounds=cp.uls_rounds, name="uls")
    els_cfg = _with(_with(cfg, "run", name="els"), "els", steps=cp.els_steps)
    # plan both before anything is written or trained: bad inputs fail here
    say(f"compute budget {cp.budget:,.0f} example gradients: ULS {cp.uls_rounds} rounds x {cp.uls_per_round:.1f}"
        f" expected per round; ELS {cp.els_steps} steps x {cp.els_batch:g} expected per step")
    els_plan = plan_els(els_cfg, store, steps=cp.els_steps)  # first: its input checks are cheap, ULS calibration is not
    dimension = build_task(cfg, store, log=say).flat.numel if mechanism_class(cfg.dp.mechanism).needs_dimension else None
    uls_plan = plan_uls(uls_cfg, store.num_users, dimension)
    say(f"ULS {uls_plan.mechanism.noise_label()}; ELS {els_plan.mechanism.noise_label()}"
        f" (user-level epsilon {els_plan.planned_epsilon:.4g}, group-privacy bound {_fmt(els_plan.group_epsilon)})")
    # the comparison directory; each method gets a run directory inside it
    if out is None:
        out = create_run_dir(_with(cfg, "run", name=cfg.compare.name))
    uls_cfg, els_cfg = _with(uls_cfg, "run", output_dir=str(out)), _with(els_cfg, "run", output_dir=str(out))
    # ULS (Flower), then ELS (centralized); evaluations at the same compute fractions
    resuming = resume_dir is not None
    uls_dir, uls = _run_or_resume(out / "uls", resuming, lambda: run(uls_cfg, "ULS", say, plan=uls_plan), say)
    els_every = max(1, round(cp.els_steps * cfg.run.eval_every / cp.uls_rounds))
    els_dir, els = _run_or_resume(out / "els", resuming,
                                  lambda: run(els_cfg, "ELS", say, plan=els_plan, eval_every=els_every), say)
    # results: table, compare.json, plot
    curves = {"ULS": _curve(uls_dir), "ELS": _curve(els_dir)}
    plot_curves(out / "compare.png", curves, f"epsilon={cfg.dp.epsilon}, delta={els['delta']:.3g},"
                f" budget {cp.budget:,.0f} example gradients")
    better = "ULS" if uls["eval_loss_after"] < els["eval_loss_after"] else "ELS"
    result = {
        "budget": cp.budget, "compute_plan": cp.as_dict(), "epsilon_target": cfg.dp.epsilon, "delta": els["delta"],
        "lower_eval_loss": better, "eval_loss_gap_els_minus_uls": els["eval_loss_after"] - uls["eval_loss_after"],
        "uls_dir": str(uls_dir), "els_dir": str(els_dir), "plot": str(out / "compare.png"),
        "curves": {k: [list(p) for p in v] for k, v in curves.items()}, "uls": uls, "els": els,
        "wall_time_s": time.time() - t0,
    }
    RunWriter(out).write_json("compare.json", result)
    print_table(uls, els, cp)
    return out, result


def main(argv: list[str]) -> int:
    from fedsim.config import load_config

    from fedsim.cli import ArgumentParser

    p = ArgumentParser(prog="fedsim compare", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/default.yaml", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set compare.budget=5000 (repeatable)")
    p.add_argument("--resume", metavar="COMPARE_DIR",
                   help="continue an interrupted comparison: keep a finished method, resume the interrupted one")
    args = p.parse_args(argv)
    resume_dir = None
    if args.resume:
        resume_dir = Path(args.resume)
        if not (resume_dir / "config.yaml").is_file():
            raise FedsimError(f"{resume_dir} is not a fedsim compare directory (no config.yaml)")
        if (resume_dir / "compare.json").is_file():
            raise FedsimError(f"{resume_dir} already finished (compare.json exists); nothing to resume")
        if args.overrides:
            raise ConfigError("--resume uses the comparison's own config.yaml; --set cannot change it")
        cfg = load_config(resume_dir / "config.yaml")
    else:
        cfg = load_config(args.config, args.overrides)
    if cfg.dp.epsilon is None or not math.isfinite(cfg.dp.epsilon):
        raise ConfigError("compare needs a privacy budget: set dp.epsilon")
    out, result = run_compare(cfg, resume_dir=resume_dir)
    print(f"comparison directory: {out} (compare.json, compare.png, uls/, els/); wall time {result['wall_time_s']:.1f}s")
    for s in (result["uls"], result["els"]):
        if not str(s.get("stop_reason", "")).startswith("completed"):
            print(f"note ({s['method']}): {s['stop_reason']}")
    return 0

