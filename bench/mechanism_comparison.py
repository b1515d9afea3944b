"""ULS mechanisms at matched (epsilon, delta) and matched compute: fixed vs adaptive clipping,
independent Gaussian vs banded matrix-factorization noise (several b), with seeds and
95% intervals (issue 19).

    python bench/mechanism_comparison.py --task shakespeare --seeds 3
    python bench/mechanism_comparison.py --task mean-estimation --seeds 5
    python bench/mechanism_comparison.py --task mean-estimation --variants fixed mf4 --epsilon 1

Variants (every other setting is the task's config; all ULS, the same rounds and expected
cohort, so the same compute; noise calibrated to the same target epsilon by each mechanism's
own accountant):

  fixed      Gaussian noise, the config's fixed clip norm (dp.adaptive_clip off)
  adaptive   Gaussian noise, adaptive clipping (Andrew et al. 2021) from the config's
             dp.adaptive_clip, or the median (target quantile 0.5) from the fixed clip
  mf1        banded MF with b = 1 (identical to `fixed`: a check)
  mf2, mf4, mf8, mf16   banded MF, b bands (banded square-root strategy), cyclic Poisson groups

Tasks:
  shakespeare      configs/default.yaml (the embedded Shakespeare users, LoRA on the small
                   pre-trained GPT-2, its own rounds and cohort), secure mode
  mean-estimation  configs/mean_estimation.yaml's problem (N 1,000 users, d 32 by default,
                   h 0), 100 rounds of an expected 50 users, one local step of lr 1 (the user's
                   mean minus the model), server SGD lr 1 (`--set uls.server_lr=0.2`: a smaller
                   step, so the model sums many rounds' noise: the prefix sums MF is built for),
                   clip 1, reproducible mode (mf1 then equals `fixed` draw for draw)

Reported per variant: epsilon spent, the noise, eval loss after training (mean and 95%
Student-t half-width over seeds), its paired difference to `fixed` over the same seeds, and
wall time. Prints JSON and a Markdown table, also written to
bench/out/mechanism_comparison_<task>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MF_BANDS = {"mf1": 1, "mf2": 2, "mf4": 4, "mf8": 8, "mf16": 16}
DEFAULT_VARIANTS = {"shakespeare": ["fixed", "adaptive", "mf2", "mf4", "mf8"],
                    "mean-estimation": ["fixed", "adaptive", "mf1", "mf2", "mf4", "mf8", "mf16"]}
CONFIGS = {"shakespeare": "configs/default.yaml", "mean-estimation": "configs/mean_estimation.yaml"}
# reproducible: the same noise stream for the same seed, so mf1 reproduces `fixed` exactly (a benchmark
# of model quality only; a real run keeps the default secure mode)
MEAN_ESTIMATION_ULS = ["dp.reproducible=true", "uls.expected_cohort=50", "run.rounds=100", "uls.client_lr=1.0", "uls.local_epochs=1",
                       "uls.server_optimizer=sgd", "uls.server_lr=1.0", "dp.clip_norm=1.0", "run.eval_every=1000"]


def variant_overrides(variant: str, cfg) -> list[str]:
    """The config overrides of a variant, on top of the task's config `cfg` (already loaded)."""
    no_adaptive = ["dp.adaptive_clip=null"] if "adaptive_clip" in type(cfg.dp).model_fields else []
    fixed = ["dp.mechanism=gaussian", *no_adaptive]
    if variant == "fixed":
        return fixed
    if variant == "adaptive":
        if cfg.dp.adaptive_clip is not None:  # the config's own adaptive clipping
            return ["dp.mechanism=gaussian"]
        return ["dp.mechanism=gaussian", "dp.adaptive_clip.target_quantile=0.5",
                f"dp.adaptive_clip.initial_clip={cfg.dp.clip_norm}"]
    if variant in MF_BANDS:
        return [*no_adaptive, "dp.mechanism=banded_mf", f"dp.banded_mf.bands={MF_BANDS[variant]}"]
    raise ValueError(f"unknown variant {variant!r}")


def one_run(task: str, variant: str, seed: int, base: list[str], out_dir: str) -> dict:
    from fedsim.config import load_config

    cfg0 = load_config(CONFIGS[task], base)
    sets = [*base, *variant_overrides(variant, cfg0), f"run.seed={seed}", f"run.output_dir={out_dir}",
            f"run.name={variant}-s{seed}"]
    cfg = load_config(CONFIGS[task], sets)
    t0 = time.perf_counter()
    if task == "mean-estimation":
        from fedsim.mean_estimation_run import run_mean_estimation

        _, summary = run_mean_estimation(cfg, "ULS", say=lambda *_: None)
    else:
        from fedsim.loop import run_uls

        _, summary = run_uls(cfg, say=lambda *_: None)
    return {"variant": variant, "seed": seed, "epsilon": summary.get("epsilon"),
            "noise": summary.get("noise"), "noise_multiplier": summary.get("noise_multiplier"),
            "eval_loss_before": summary.get("eval_loss_before"), "eval_loss_after": summary.get("eval_loss_after"),
            "final_clip_norm": summary.get("final_clip_norm"), "wall_s": time.perf_counter() - t0}


def interval(xs: list[float]) -> tuple[float, float]:
    """(mean, 95% Student-t half-width); half-width nan for one value."""
    from scipy import stats

    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, float(stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=list(CONFIGS), default="mean-estimation")
    ap.add_argument("--variants", nargs="+", default=None, choices=["fixed", "adaptive", *MF_BANDS])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=None, help="target epsilon (default: the config's, or 4)")
    ap.add_argument("--dim", type=int, default=32, help="mean estimation: d")
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", default=None, help="a JSON this script wrote: its runs join this run's (other variants)")
    args = ap.parse_args()
    variants = args.variants or DEFAULT_VARIANTS[args.task]
    base = list(args.set)
    if args.task == "mean-estimation":
        base = [*MEAN_ESTIMATION_ULS, f"mean_estimation.dim={args.dim}", f"dp.epsilon={args.epsilon or 4.0}", *base]
    elif args.epsilon is not None:
        base.append(f"dp.epsilon={args.epsilon}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # interleaved: every variant once per seed
            for v in variants:
                row = one_run(args.task, v, seed, base, tmp)
                rows.append(row)
                print(f"seed {seed} {v}: eps {row['epsilon']:.3f}, {row['noise']}, eval loss"
                      f" {row['eval_loss_before']:.5g} -> {row['eval_loss_after']:.5g}, {row['wall_s']:.0f} s",
                      file=sys.stderr, flush=True)
    if args.merge:  # variants measured earlier on the same task and overrides
        earlier = json.loads(Path(args.merge).read_text())
        if earlier["task"] != args.task or earlier["overrides"] != base:
            sys.exit(f"--merge {args.merge}: another task or other overrides")
        rows = [r for r in earlier["runs"] if r["variant"] not in variants] + rows
        variants = list(dict.fromkeys([*earlier["summary"], *variants]))
    summary = {}
    base_loss = {r["seed"]: r["eval_loss_after"] for r in rows if r["variant"] == "fixed"}
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        mean, hw = interval([r["eval_loss_after"] for r in rs])
        s = {"epsilon": statistics.fmean(r["epsilon"] for r in rs), "noise": rs[0]["noise"],
             "eval_loss_after_mean": mean, "eval_loss_after_95": hw,
             "eval_loss_before": rs[0]["eval_loss_before"], "wall_s_mean": statistics.fmean(r["wall_s"] for r in rs),
             "seeds": len(rs)}
        if base_loss and v != "fixed":
            diff = [r["eval_loss_after"] - base_loss[r["seed"]] for r in rs if r["seed"] in base_loss]
            s["vs_fixed_mean"], s["vs_fixed_95"] = interval(diff)
        summary[v] = s
    lines = ["| variant | epsilon | noise | eval loss after (95%) | vs fixed, paired (95%) | s / run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v, s in summary.items():
        vs = "—" if "vs_fixed_mean" not in s else f"{s['vs_fixed_mean']:+.4g} ± {s['vs_fixed_95']:.2g}"
        lines.append(f"| {v} | {s['epsilon']:.3f} | {s['noise']} | {s['eval_loss_after_mean']:.5g} ±"
                     f" {s['eval_loss_after_95']:.2g} | {vs} | {s['wall_s_mean']:.0f} |")
    result = {"task": args.task, "config": CONFIGS[args.task], "overrides": base, "date": time.strftime("%Y-%m-%d"),
              "summary": summary, "runs": rows, "table": "\n".join(lines)}
    stem = Path(args.out) if args.out else ROOT / "bench" / "out" / f"mechanism_comparison_{args.task}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(result, indent=2))  # not with_suffix: "lr0.2"
    stem.parent.joinpath(stem.name + ".md").write_text(result["table"] + "\n")
    print(json.dumps(result, indent=2))
    print(result["table"], file=sys.stderr)


if __name__ == "__main__":
    main()
