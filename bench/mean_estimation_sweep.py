"""ULS vs ELS on the paper's synthetic mean-estimation task, over privacy and compute budgets.

    python bench/mean_estimation_sweep.py [configs/mean_estimation.yaml] [--set mean_estimation.seeds=5] [--quick]

For every heterogeneity h, compute budget B (per-example gradient evaluations) and
user-level epsilon (same delta for both), each method is tuned over a small grid and its
best mean final excess loss ||w - mu||^2 / 2 (over seeds) is kept (choosing the best setting
by its final loss is NOT private: no accountant covers the tuning, as in the paper's study;
each reported epsilon is that of one run at the chosen setting):
  ULS: expected cohort c and examples per sampled user m_u (rounds = B / (c m_u E)),
       clip C, server lr;
  ELS: examples per user k and expected batch b (steps = B / b), clip C, lr.
Noise comes from fedsim's calibration: the Poisson-Gaussian PLD for ULS
(`calibrate_gaussian_noise_multiplier`), the Binomial(k, q) mixture PLD for ELS
(`calibrate_els_noise`); noise is added by `GaussianMechanism.add_noise`. Calibrations are
cached in the fedsim cache directory ($FEDSIM_CACHE_DIR). Writes bench/out/mean_estimation.json,
mean_estimation.png and mean_estimation.md (table) and prints the table and the findings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def calibrations(me, n, delta, say) -> dict:
    """sigma for every (method shape, budget, epsilon); cached on disk by its key."""
    from fedsim.rundir import cache_dir
    from fedsim.privacy.calibration import calibrate_gaussian_noise_multiplier
    from fedsim.privacy.els_accounting import calibrate_els_noise

    path = cache_dir() / "mean_estimation_calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = json.loads(path.read_text()) if path.is_file() else {}
    m, e = me.examples_per_user, me.uls_local_epochs
    todo = []
    for budget in me.budgets:
        for c in me.uls_cohorts:
            for mu_ in me.uls_examples_per_user:
                rounds = max(1, round(budget / (c * min(mu_, m) * e)))
                todo += [("uls", c / n, rounds, 0, eps) for eps in me.epsilons]
        for k in me.els_k:
            for b in me.els_batches:
                if b > n * k:
                    continue
                steps = max(1, round(budget / b))
                todo += [("els", b / (n * k), steps, k, eps) for eps in me.epsilons]
    t0 = time.time()
    for i, (kind, q, steps, k, eps) in enumerate(todo):
        key = f"{kind}|q={q:.8g}|T={steps}|k={k}|eps={eps:g}|delta={delta:g}|vdi={me.accounting_interval:g}"
        if key in cache:
            continue
        if kind == "uls":
            cache[key] = calibrate_gaussian_noise_multiplier(q, steps, eps, delta)
        else:
            cache[key] = calibrate_els_noise(k, q, steps, eps, delta, interval=me.accounting_interval)
        say(f"  calibrated {i + 1}/{len(todo)} {key}: sigma={cache[key]:.4g} ({time.time() - t0:.0f}s)")
        path.write_text(json.dumps(cache, indent=1))
    return cache


def sweep(cfg, say=print) -> dict:
    import torch

    from fedsim.models.mean_estimation import MeanEstimationProblem, run_els, run_uls
    from fedsim.privacy.mechanisms import GaussianMechanism
    from fedsim.plan import default_delta

    me, n = cfg.mean_estimation, cfg.data.num_users
    delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(n)
    say(f"calibrating noise ({len(me.budgets)} budgets x {len(me.epsilons)} epsilons; cached)")
    cal = calibrations(me, n, delta, say)
    lrs = torch.tensor(me.lrs)
    grid = [(eps, c) for eps in me.epsilons for c in me.clip_norms]  # one mechanism group each
    m, e = me.examples_per_user, me.uls_local_epochs
    rows = []
    t0 = time.time()
    for h in me.heterogeneities:
        problem = MeanEstimationProblem(n, m, me.dim, h, seed=cfg.run.seed)
        mu, x = problem.generate()
        for budget in me.budgets:
            best: dict[tuple[str, float], dict] = {}

            def keep(method, losses, shape, sigmas):
                # losses [S, G, L]: mean over seeds, best (clip, lr) per epsilon
                mean, std = losses.mean(0), losses.std(0) if losses.shape[0] > 1 else torch.zeros_like(losses[0])
                for gi, (eps, clip) in enumerate(grid):
                    li = int(mean[gi].argmin())
                    cand = {"loss": float(mean[gi, li]), "std": float(std[gi, li]), "clip": clip, "lr": me.lrs[li],
                            "sigma": sigmas[eps], **shape}
                    if (method, eps) not in best or cand["loss"] < best[(method, eps)]["loss"]:
                        best[(method, eps)] = cand

            for c in me.uls_cohorts:
                for used in {min(u, m) for u in me.uls_examples_per_user}:
                    q, rounds = c / n, max(1, round(budget / (c * used * e)))
                    sig = {eps: cal[f"uls|q={q:.8g}|T={rounds}|k=0|eps={eps:g}|delta={delta:g}|vdi={me.accounting_interval:g}"]
                           for eps in me.epsilons}
                    mechs = [GaussianMechanism(clip, sig[eps]) for eps, clip in grid]
                    r = run_uls(x, mu, rounds=rounds, q=q, mechanisms=mechs, server_lrs=lrs, seeds=me.seeds,
                                examples_per_user=used, local_epochs=e, noise_seed=cfg.run.seed)
                    keep("ULS", r["excess_loss"], {"cohort": c, "examples_per_user": used, "rounds": rounds,
                                                   "compute": r["compute"]}, sig)
            for k in me.els_k:
                for b in me.els_batches:
                    if b > n * k:
                        continue
                    p, steps = b / (n * k), max(1, round(budget / b))
                    sig = {eps: cal[f"els|q={p:.8g}|T={steps}|k={k}|eps={eps:g}|delta={delta:g}|vdi={me.accounting_interval:g}"]
                           for eps in me.epsilons}
                    mechs = [GaussianMechanism(clip, sig[eps]) for eps, clip in grid]
                    r = run_els(x, mu, steps=steps, k=k, p=p, mechanisms=mechs, lrs=lrs, seeds=me.seeds,
                                noise_seed=cfg.run.seed)
                    keep("ELS", r["excess_loss"], {"k": k, "batch": b, "steps": steps, "compute": r["compute"]}, sig)
            for eps in me.epsilons:
                u, s = best[("ULS", eps)], best[("ELS", eps)]
                rows.append({"heterogeneity": h, "budget": budget, "epsilon": eps, "delta": delta, "uls": u, "els": s,
                             "winner": "ULS" if u["loss"] < s["loss"] else "ELS", "els_over_uls": s["loss"] / u["loss"]})
            say(f"  h={h:g} budget={budget:,}: " + ", ".join(
                f"eps={r['epsilon']:g} {r['winner']} ({r['els_over_uls']:.2f}x)" for r in rows[-len(me.epsilons):])
                + f" ({time.time() - t0:.0f}s)")
    return {"config": json.loads(cfg.model_dump_json())["mean_estimation"], "num_users": n, "delta": delta,
            "rows": rows, "findings": findings(rows, me)}


def findings(rows: list[dict], me) -> list[str]:
    """Plain-language summary of where each method wins."""
    out = []
    for h in me.heterogeneities:
        sub = [r for r in rows if r["heterogeneity"] == h]
        uls = [r for r in sub if r["winner"] == "ULS"]
        out.append(f"h={h:g}: ULS wins {len(uls)}/{len(sub)} settings; ELS wins at " + (", ".join(
            f"(eps={r['epsilon']:g}, budget={r['budget']:,})" for r in sub if r["winner"] == "ELS") or "none"))
        lo_eps, hi_eps = min(me.epsilons), max(me.epsilons)
        lo_b, hi_b = min(me.budgets), max(me.budgets)
        for label, sel in [(f"strongest privacy eps={lo_eps:g}", lambda r: r["epsilon"] == lo_eps),
                           (f"weakest privacy eps={hi_eps:g}", lambda r: r["epsilon"] == hi_eps),
                           (f"largest budget {hi_b:,}", lambda r: r["budget"] == hi_b),
                           (f"smallest budget {lo_b:,}", lambda r: r["budget"] == lo_b)]:
            rs = [r for r in sub if sel(r)]
            gm = math.exp(sum(math.log(r["els_over_uls"]) for r in rs) / len(rs))
            out.append(f"  {label}: ELS/ULS excess-loss ratio, geometric mean {gm:.2f} (>1: ULS better)")
    return out


def table_markdown(rows: list[dict]) -> str:
    lines = ["| h | budget | epsilon | ULS loss | ULS setting | ELS loss | ELS setting | ELS/ULS | winner |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u, s = r["uls"], r["els"]
        lines.append(f"| {r['heterogeneity']:g} | {r['budget']:,} | {r['epsilon']:g} | {u['loss']:.3g} | cohort {u['cohort']:g},"
                     f" m_u={u['examples_per_user']}, {u['rounds']} rounds, C={u['clip']:g}, lr={u['lr']:g}, sigma={u['sigma']:.3g} | {s['loss']:.3g} |"
                     f" k={s['k']}, batch {s['batch']:g}, {s['steps']} steps, C={s['clip']:g}, lr={s['lr']:g},"
                     f" sigma={s['sigma']:.3g} | {r['els_over_uls']:.2f} | {r['winner']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, me) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = me.heterogeneities
    fig, axes = plt.subplots(1, len(hs), figsize=(5 * len(hs), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, h in zip(axes[0], hs):
        for i, eps in enumerate(me.epsilons):
            sub = sorted((r for r in rows if r["heterogeneity"] == h and r["epsilon"] == eps), key=lambda r: r["budget"])
            bs = [r["budget"] for r in sub]
            ax.plot(bs, [r["uls"]["loss"] for r in sub], "-o", color=colors[i % len(colors)], label=f"ULS eps={eps:g}")
            ax.plot(bs, [r["els"]["loss"] for r in sub], "--s", color=colors[i % len(colors)], label=f"ELS eps={eps:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute budget (per-example gradients)")
        ax.set_ylabel("excess loss ||w - mu||^2 / 2 (best tuned)")
        ax.set_title(f"mean estimation, heterogeneity h={h:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from fedsim.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=str(ROOT / "configs" / "mean_estimation.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="a small grid (smoke test of the script)")
    args = p.parse_args(argv)
    ov = list(args.overrides)
    if args.quick:
        ov += ["mean_estimation.budgets=[4000,32000]", "mean_estimation.epsilons=[1,16]", "mean_estimation.seeds=2",
               "mean_estimation.els_k=[1,4]", "mean_estimation.els_batches=[100]", "mean_estimation.uls_cohorts=[50]",
               "mean_estimation.uls_examples_per_user=[4,16]",
               "mean_estimation.accounting_interval=0.05"]
    cfg = load_config(args.config, ov)
    import torch

    torch.set_num_threads(cfg.run.threads or 1)
    t0 = time.time()
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    result = sweep(cfg, say)
    result["wall_time_s"] = time.time() - t0
    out, stem = ROOT / "bench" / "out", "mean_estimation_quick" if args.quick else "mean_estimation"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table_markdown(result["rows"]))
    plot(result["rows"], out / f"{stem}.png", cfg.mean_estimation)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mean estimation: best tuned excess loss, N={result['num_users']}, delta={result['delta']:g}")
    for col in ("h", "budget", "eps", "ULS", "ELS", "ELS/ULS", "winner", "ULS cohort/m_u", "ELS k/batch"):
        t.add_column(col)
    for r in result["rows"]:
        t.add_row(f"{r['heterogeneity']:g}", f"{r['budget']:,}", f"{r['epsilon']:g}", f"{r['uls']['loss']:.3g}",
                  f"{r['els']['loss']:.3g}", f"{r['els_over_uls']:.2f}", r["winner"],
                  f"{r['uls']['cohort']:g}/{r['uls']['examples_per_user']}", f"{r['els']['k']}/{r['els']['batch']:g}")
    Console(stderr=True).print(t)
    for line in result["findings"]:
        print(line, file=sys.stderr)
    print(json.dumps({"out": str(out / f"{stem}.json"), "findings": result["findings"],
                      "wall_time_s": result["wall_time_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
