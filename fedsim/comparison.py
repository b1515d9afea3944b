"""`fedsim compare CONFIG [--set k=v]`: ULS vs ELS at the same (epsilon, delta) and compute, beside a non-private reference.

Compute is counted in per-example gradient evaluations: ULS expects q * sum_u used(u) per
round (`fedsim.plan.uls_users_compute`), ELS its expected batch per step. `compare.budget`
fixes the total (None: ULS's planned compute over run.rounds); each method gets as many
rounds/steps as fit, and is calibrated to dp.epsilon at the same delta under its own
accountant. The non-private reference (`compare.methods`, `compare.reference`) gets the same
compute and hyper-parameters, no noise, and keeps the clipping unless compare.reference_clip is
false. The result: one table in 80 columns, a comparison directory with a run directory per
method, `compare.json` and `compare.png` (eval loss vs compute spent).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fedsim.errors import ConfigError, FedsimError


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
    ax.set_ylabel("eval loss (held-out examples)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


UNMATCHED = 0.1  # ULS's and ELS's planned compute further apart than this share of the budget: a warning

#: compare.methods name -> (the row's label, compare.json key, run directory name)
ROWS = {"uls": ("ULS", "uls", "uls"), "els": ("ELS", "els", "els"), "non-private": ("non-private", "reference", "reference")}


def _shape(s: dict) -> str:
    if s["method"] == "ULS":
        mech = s.get("mechanism") or {}
        bands = f", MF b={mech['bands']}" if mech.get("mechanism") == "banded_mf" else ""
        return f"{s['steps']} rounds x {s['expected_cohort']:g}{bands}"
    return f"{s['steps']} steps x {s['expected_batch']:g} k{s['k']}"


def _short(x: float, spec: str) -> str:
    """`spec` for ordinary values; 4 significant digits for huge or non-finite ones (a diverged run)."""
    return format(x, spec) if abs(x) < 1e4 else format(x, ".4g")


def print_results(rows: list[tuple[str, dict]], title: str | None = None) -> None:
    """Run summaries as one table in 80 columns (`fedsim run`, `fedsim compare`), then the
    shared delta and eval loss before training as a plain line."""
    from fedsim.console import print_table

    table = []
    for label, s in rows:
        eps = "inf" if s.get("target_epsilon") is None else f"{s['epsilon']:.3g}/{s['target_epsilon']:g}"
        sigma = s.get("noise_multiplier")
        table.append([label, eps, s["noise"] if sigma is None else f"{sigma:.3g}", _shape(s), f"{s['compute_examples']:,}",
                      _short(s["eval_loss_after"], ".4f"), _short(s["eval_perplexity_after"], ".2f"),
                      f"{s['wall_time_s']:.0f}s"])
    print_table(["method", "eps/target", "sigma", "shape", "compute", "eval loss", "ppl", "time"], table, title,
                right=("eps/target", "sigma", "compute", "eval loss", "ppl", "time"))
    first = rows[0][1]
    print(f"delta={first['delta']:.2g}; eval loss before training {first['eval_loss_before']:.4f}")


def print_table(result: dict) -> None:
    """The comparison: one row per method, then ELS's group-privacy bound."""
    print_results([(ROWS[n][0], result[ROWS[n][1]]) for n in result["methods"]],
                  title=f"same (epsilon, delta), budget {result['compute_plan']['budget']:,.0f} example gradients")
    els = result.get("els")
    if els is not None and els.get("group_privacy_epsilon") is not None:
        print(f"ELS user-level epsilon {_fmt(els['epsilon'])} (mixture PLD); group privacy would give"
              f" {_fmt(els['group_privacy_epsilon'])}")
    for note in result.get("notes", []):
        print(f"note: {note}")


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
    ledger = run_dir / "privacy_ledger.jsonl"
    if not (run_dir / "checkpoint.json").is_file() and not (ledger.is_file() and ledger.stat().st_size):
        # interrupted while starting, before its first release: nothing was spent, start it again
        import shutil

        say(f"{run_dir.name}: interrupted before its first release; started again")
        shutil.rmtree(run_dir)
        return start()
    say(f"{run_dir.name}: resuming from its last checkpoint")
    return resume(run_dir, say=say)


def _with(cfg, section: str, **values):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def non_private(cfg):
    """The reference's config: the same data, model, hyper-parameters and compute, no noise;
    no clipping either unless compare.reference_clip."""
    cfg = _with(_with(cfg, "dp", epsilon=None, noise_multiplier=0.0, mechanism="gaussian", lmo=None, banded_mf=None),
                "run", name="reference")
    if cfg.compare.reference_clip:
        return cfg
    return _with(_with(cfg, "dp", clip_norm=math.inf, adaptive_clip=None), "els", clip_norm=math.inf)


def run_compare(cfg, say=print, resume_dir: Path | None = None, out_dir: Path | None = None) -> tuple[Path, dict]:
    """The methods of `compare.methods` (ULS, ELS, the non-private reference) at matched
    (epsilon, delta) and compute. `resume_dir`: an interrupted comparison directory (its
    config.yaml is `cfg`); a finished method is kept, an interrupted one resumes from its
    checkpoint, one not yet started runs. `out_dir`: create exactly this directory (a sweep's
    cell) instead of <run.output_dir>/<compare.name>."""
    from fedsim import interrupt
    from fedsim.data import build_store
    from fedsim.loop import run
    from fedsim.models import build_task
    from fedsim.plan import mechanism_class, plan_compute, plan_els, plan_uls
    from fedsim.rundir import RunWriter, create_run_dir

    from fedsim.auditing.canaries import refuse_canaries

    refuse_canaries(cfg, "compare")  # before the comparison directory exists
    t0 = time.time()
    if cfg.dp.noise_multiplier is not None:  # each method gets its own sigma for the shared budget
        say(f"note: dp.noise_multiplier={cfg.dp.noise_multiplier:g} is ignored; both methods are calibrated to dp.epsilon")
        cfg = _with(cfg, "dp", noise_multiplier=None)
    methods = list(dict.fromkeys(cfg.compare.methods))
    store = build_store(cfg.data)
    cp = plan_compute(cfg, store)
    uls_cfg = _with(cfg, "run", rounds=cp.uls_rounds, name="uls")
    els_cfg = _with(_with(cfg, "run", name="els"), "els", steps=cp.els_steps)
    notes = []
    if cfg.dp.mechanism == "banded_mf" and "els" in methods:  # banded MF is accounted for ULS only
        notes.append("the ELS arm adds independent Gaussian noise (banded MF is a ULS mechanism here), calibrated to"
                     " the same (epsilon, delta)")
        say(f"note: {notes[-1]}")
        els_cfg = _with(els_cfg, "dp", mechanism="gaussian", banded_mf=None)
    ref_cfg = non_private(uls_cfg if cfg.compare.reference == "uls" else els_cfg)
    # plan every method before anything is written or trained: bad inputs fail here
    say(f"compute budget {cp.budget:,.0f} example gradients: ULS {cp.uls_rounds} rounds x {cp.uls_per_round:.1f}"
        f" expected per round; ELS {cp.els_steps} steps x {cp.els_batch:g} expected per step")
    plans = {}
    if "els" in methods:  # first: its input checks are cheap, ULS calibration is not
        plans["els"] = plan_els(els_cfg, store, steps=cp.els_steps)
    if "uls" in methods:
        needs = mechanism_class(cfg.dp.mechanism).needs_dimension
        plans["uls"] = plan_uls(uls_cfg, store.num_users, build_task(cfg, store, log=say).flat.numel if needs else None)
    if "non-private" in methods:
        plans["non-private"] = (plan_uls(ref_cfg, store.num_users) if cfg.compare.reference == "uls"
                                else plan_els(ref_cfg, store, steps=cp.els_steps, group_bound=False))
    gap = abs(cp.uls_expected - cp.els_expected) / cp.budget
    if gap > UNMATCHED and {"uls", "els"} <= set(plans):  # whole rounds and steps cannot split a small budget
        # evenly; each run prints its plan's warnings as it starts and keeps them in summary.json
        import dataclasses

        warning = (f"unmatched compute: ULS plans {cp.uls_expected:,.0f} example gradients and ELS"
                   f" {cp.els_expected:,.0f} for a budget of {cp.budget:,.0f} ({gap:.0%} apart); raise compare.budget")
        plans = {n: dataclasses.replace(p, warnings=(*p.warnings, warning)) for n, p in plans.items()}
    for name, plan in plans.items():
        extra = (f" (user-level epsilon {plan.planned_epsilon:.4g}, group-privacy bound {_fmt(plan.group_epsilon)})"
                 if name == "els" else "")
        noise = plan.mechanism.noise_label() if name != "non-private" else (
            f"no noise, clip {plan.mechanism.clip_norm:g}" if cfg.compare.reference_clip else "no clipping, no noise")
        say(f"{ROWS[name][0]}: {noise}{extra}")
    # the comparison directory; each method gets a run directory inside it
    if resume_dir is not None:
        out = Path(resume_dir)
    elif out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True)
        from fedsim.rundir import atomic_write_text, config_yaml

        atomic_write_text(out / "config.yaml", config_yaml(cfg))
    else:
        out = create_run_dir(_with(cfg, "run", name=cfg.compare.name))
    cfgs = {"uls": uls_cfg, "els": els_cfg, "non-private": ref_cfg}
    els_every = max(1, round(cp.els_steps * cfg.run.eval_every / cp.uls_rounds))  # evaluations at the same compute fractions
    summaries, dirs = {}, {}
    with interrupt.resumable(f"fedsim compare --resume {out}"):  # Ctrl-C: resumed as a comparison
        for name in ("uls", "els", "non-private"):  # ULS (Flower), ELS (centralized), then the reference
            if name not in methods:
                continue
            _, key, sub = ROWS[name]
            c = _with(cfgs[name], "run", output_dir=str(out))
            method = plans[name].method
            every = els_every if method == "ELS" else None
            dirs[key], summaries[key] = _run_or_resume(
                out / sub, resume_dir is not None,
                lambda c=c, method=method, plan=plans[name], every=every: run(c, method, say, plan=plan, eval_every=every),
                say)
    # results: compare.json, plot, table
    curves = {ROWS[n][0]: _curve(dirs[ROWS[n][1]]) for n in methods}
    plot_curves(out / "compare.png", curves, f"epsilon={cfg.dp.epsilon}, delta={plans[methods[0]].delta:.3g},"
                f" budget {cp.budget:,.0f} example gradients")
    result = {"budget": cp.budget, "compute_plan": cp.as_dict(), "epsilon_target": cfg.dp.epsilon,
              "delta": plans[methods[0]].delta, "methods": methods, "reference_shape": cfg.compare.reference,
              **{f"{ROWS[n][1]}_dir": str(dirs[ROWS[n][1]]) for n in methods}, "plot": str(out / "compare.png"),
              "curves": {k: [list(p) for p in v] for k, v in curves.items()}, "notes": notes, **summaries}
    if "uls" in methods and "els" in methods:
        uls, els = summaries["uls"], summaries["els"]
        result.update(lower_eval_loss="ULS" if uls["eval_loss_after"] < els["eval_loss_after"] else "ELS",
                      eval_loss_gap_els_minus_uls=els["eval_loss_after"] - uls["eval_loss_after"])
    result["wall_time_s"] = time.time() - t0
    RunWriter(out).write_json("compare.json", result)
    print_table(result)
    return out, result


def main(argv: list[str]) -> int:
    from fedsim.cli import ArgumentParser
    from fedsim.config import load_config

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
        if (resume_dir / "privacy_ledger.jsonl").is_file() or (resume_dir / "metrics.jsonl").is_file():
            raise FedsimError(f"{resume_dir} is a single run, not a comparison; continue it with"
                              f" fedsim run --resume {resume_dir}")
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
    subs = ", ".join(ROWS[n][2] + "/" for n in result["methods"])
    print(f"comparison directory: {out} (compare.json, compare.png, {subs}); wall time {result['wall_time_s']:.1f}s")
    for s in (result[ROWS[n][1]] for n in result["methods"]):
        if not str(s.get("stop_reason", "")).startswith("completed"):
            print(f"note ({s['method']}): {s['stop_reason']}")
    return 0

