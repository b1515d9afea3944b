"""`fedsim audit`: train as configured with canary users in the population, then ask what the
released model and updates reveal about them (docs/architecture.md, "Auditing").

One run. Canaries (`fedsim/auditing/canaries.py`) are included by secret fair coins; the
`CanaryObserver` sees only what an adversary of each threat model sees: the initial and final
trainable weights ("final model"), and every released update ("all iterates"). From those it
scores every canary, without the coins, by statistics fixed in advance:

* ``final-model``       cos(theta_T - theta_0, c_j) (gradient canaries), or the drop in the
                        canary sequence's loss from theta_0 to theta_T (text canaries);
* ``all-iterates``      max over releases t of cos(u_t, c_j);
* ``differenced``       max over t of cos(u_t - u_{t-1}, c_j): what one noise vector reused in
                        every release leaves (it cancels in the difference);
* ``cohort-known``      with `auditor_knows_sampling` (default: a `dp.reproducible` run, whose
                        key is a public function of run.seed): the auditor regenerates the
                        cohorts (ELS batches) and sums <u_t, c_j> over the releases canary j
                        was sampled into, normalised;
* ``noise-known``       likewise: each release times its public denominator minus the noise
                        regenerated from run.seed, i.e. the clipped sum itself; max over t.

Then, against the coins:

* the **one-run lower bound** (Steinke, Nasr and Jagielski 2023): for each statistic, guesses on
  the highest and lowest scores; the bound holds at `audit.confidence` for the best of every
  statistic and guess count tried (the failure probability is split over all of them);
* the **one-shot estimate** (Andrew et al. 2024) of the final-model and all-iterates cosines:
  included canaries against the excluded ones (random directions never inserted);
* **exposure** (Carlini et al. 2019) of text canaries against `audit.references` random sequences.

Verdict: "consistent" if the lower bound is at most the reported epsilon, else "VIOLATION".

The audit's privacy cost: none beyond the run's. Canaries are users of the population the plan
was made for (N = real users + canaries, the sampling rate q kept at the configured one by
scaling the expected cohort / batch), and the reported epsilon covers each of them as any user.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.auditing.canaries import Canaries
from fedsim.errors import ConfigError

DEFAULT_CANARIES = 1000
#: directions held at once for scoring: [m, d] float32 above this many bytes is refused
MAX_DIRECTION_BYTES = 4 << 30


class CanaryObserver:
    """The loop's observer (`fedsim.loop.train`): what the released outputs say about each canary."""

    def __init__(self, canaries: Canaries):
        self.canaries = canaries
        self.proj: list[np.ndarray] = []  # <u_t, c_j> per release, [m] each
        self.norms: list[float] = []  # ||u_t||
        self.diff_proj: list[np.ndarray] = []  # <u_t - u_{t-1}, c_j>
        self.diff_norms: list[float] = []
        self.steps: list[int] = []
        self._prev: torch.Tensor | None = None
        self.final_cos = None
        self.loss_before = self.loss_after = None

    def on_start(self, task, plan, randomness) -> None:
        c, d = self.canaries, task.flat.numel
        self.plan, self.included = plan, c.inclusion(randomness)
        self.start_weights = task.flat.get().detach().to("cpu", torch.float32).clone()
        if c.kind == "gradient":
            if c.count * d * 4 > MAX_DIRECTION_BYTES:
                raise ConfigError(f"{c.count} canaries x {d:,} trainable weights need {c.count * d * 4 / 2**30:.1f} GiB"
                                  " of directions: lower --canaries")
            self.directions = c.directions(d)  # [m, d] unit rows
        else:
            from fedsim.auditing.canaries import sequence_losses

            self.texts = [c.text(j) for j in range(c.count)]
            self.references = c.reference_texts(task.cfg.audit.references)
            self.loss_before = sequence_losses(task, self.texts)

    def on_release(self, step: int, update: torch.Tensor) -> None:
        if self.canaries.kind != "gradient":
            return
        u = update.detach().to("cpu", torch.float32).reshape(-1)
        p = (self.directions @ u).double().numpy()
        self.steps.append(int(step))
        self.proj.append(p)
        self.norms.append(float(u.double().norm()))
        if self._prev is not None:
            self.diff_proj.append(p - self.proj[-2])
            self.diff_norms.append(float((u - self._prev).double().norm()))
        self._prev = u.clone()

    def on_end(self, task) -> None:
        if self.canaries.kind == "gradient":
            delta = task.flat.get().detach().to("cpu", torch.float32) - self.start_weights
            self.final_cos = (self.directions @ delta).double().numpy() / max(float(delta.double().norm()), 1e-30)
        else:
            from fedsim.auditing.canaries import sequence_losses

            self.loss_after = sequence_losses(task, self.texts)
            self.reference_losses = sequence_losses(task, self.references)

    # -- scores (no coins used) --------------------------------------------------------------------
    def scores(self, known: dict | None = None) -> dict[str, np.ndarray]:
        """Every statistic's score per canary. `known` (an auditor holding the key): `cohorts`
        [releases, m], how many of canary j's contributions each release sampled, and `noise`
        [releases, m], <z_t, c_j> of each release's noise, both regenerated."""
        if self.canaries.kind == "text":
            return {"final-model": self.loss_before - self.loss_after}
        m = self.canaries.count
        out = {"final-model": self.final_cos}
        if self.proj:
            cos = np.stack(self.proj) / np.maximum(np.asarray(self.norms), 1e-30)[:, None]
            out["all-iterates"] = cos.max(0)
        if self.diff_proj:
            dcos = np.stack(self.diff_proj) / np.maximum(np.asarray(self.diff_norms), 1e-30)[:, None]
            out["differenced"] = dcos.max(0)
        if known is not None and self.proj:
            w = known["cohorts"][:len(self.proj)].astype(np.float64)
            num = (w * np.stack(self.proj)).sum(0)
            out["cohort-known"] = num / np.sqrt(np.maximum((w * w).sum(0), 1.0))
            # the released update times the public denominator, minus the regenerated noise: the
            # clipped sum itself (sign: a canary's contribution points along +c_j in both methods)
            sign = 1.0 if self.plan.k is None else -1.0
            clean = np.stack(self.proj) * self.plan.denominator - sign * known["noise"][:len(self.proj)]
            out["noise-known"] = clean.max(0)
        return {k: np.nan_to_num(np.asarray(v, dtype=np.float64)[:m], nan=0.0) for k, v in out.items()}


def regenerate_cohorts(cfg, plan, canaries: Canaries, steps: list[int]) -> np.ndarray:
    """[releases, m]: how many of each canary's contributions every release sampled, recomputed
    from run.seed. Right only when the run's key is the public function of run.seed that
    `dp.reproducible: true` makes it: the leak the auditor exploits."""
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.sampling import PoissonSampler, participation_sampler

    r = SecretRandomness.from_seed(cfg.run.seed)
    out = np.zeros((len(steps), canaries.count), dtype=np.int64)
    if plan.k is None:  # the run's own schema: Poisson, or cyclic Poisson over the mechanism's groups (banded MF)
        sampler = participation_sampler(plan.num_users, plan.q, plan.mechanism.participation_groups, r, "uls-cohort")
        for i, t in enumerate(steps):
            j = canaries.index(sampler.sample(t))
            np.add.at(out[i], j[j >= 0], 1)
    else:
        sampler = PoissonSampler(plan.num_examples, plan.q, r, "els-sample")
        for i, t in enumerate(steps):
            j = canaries.index(plan.example_user[sampler.sample(t)])
            np.add.at(out[i], j[j >= 0], 1)
    return out


def regenerate_noise_projections(cfg, observer: CanaryObserver) -> np.ndarray:
    """[releases, m]: <z_t, c_j> for the noise z_t each release drew, regenerated from run.seed
    by the mechanism's own noise process (`NoiseMechanism.noise_process`: the same stream, the same
    chunks, and for banded MF the same correlation across releases), added to zeros. Right only
    when the key is the public function of run.seed that `dp.reproducible: true` makes it."""
    from fedsim.privacy.randomness import SecretRandomness

    plan, d = observer.plan, observer.directions.shape[1]
    purpose = "uls" if plan.k is None else "els"
    process = plan.mechanism.noise_process(SecretRandomness.from_seed(cfg.run.seed), f"{purpose}-noise")
    out = np.zeros((len(observer.steps), observer.canaries.count))
    for i, t in enumerate(observer.steps):
        z = process.add(torch.zeros(d, dtype=torch.float64), t)[0]
        out[i] = (observer.directions.double() @ z).numpy()
    return out


# -- the run ---------------------------------------------------------------------------------------


TASKS = ("lm", "mean-estimation")


def real_store(cfg, task: str):
    """The configured population, without canaries."""
    if task == "mean-estimation":
        from fedsim.mean_estimation_run import build_vector_store

        return build_vector_store(cfg)[0]
    from fedsim.data import build_store

    return build_store(cfg.data)


def audit_config(cfg, method: str, canaries: int | None = None, kind: str | None = None, task: str = "lm"):
    """The config of the audit run: canaries set; the configured run's sampling rate q, rounds and
    ELS steps kept (the expected cohort / batch, the public denominators, scale with the population)."""
    from fedsim.plan import kept_examples, plan_compute, resolve_delta

    m = int(canaries or cfg.audit.canaries or DEFAULT_CANARIES)
    if m < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {m}")
    new = cfg.model_copy(deep=True)
    new.audit.canaries = m
    if kind is not None:
        new.audit.kind = kind
    if task == "mean-estimation" and new.audit.kind != "gradient":
        raise ConfigError("the mean-estimation task has gradient canaries only (audit.kind: gradient)")
    store = real_store(cfg, task)
    n = store.num_users
    new.dp.delta = resolve_delta(cfg, n)[0]  # the configured run's delta (the default depends on N)
    if method == "ULS" and cfg.uls.sampling_rate is None:  # same q = expected_cohort / N over N + m users
        new.uls.expected_cohort = cfg.uls.expected_cohort * (n + m) / n
    if method == "ELS":
        new.els.steps = cfg.els.steps or plan_compute(cfg, store).els_steps  # the configured run's steps
        if cfg.els.sampling_rate is None:  # same q over the kept examples and the canaries'
            kept = kept_examples(store.train_example_counts(), cfg.els.k, cfg.run.seed)[0].size
            new.els.expected_batch = cfg.els.expected_batch * (kept + m * cfg.els.k) / kept
    new.run.name = f"{cfg.run.name}-audit-{method.lower()}"
    return new, n


def run_audit(cfg, method: str = "ULS", canaries: int | None = None, kind: str | None = None, say=print,
              auditor_knows_sampling: bool | None = None, task: str = "lm") -> tuple[Path, dict]:
    """Run `cfg` with canaries and audit it; returns (run directory, audit.json's content).
    `task`: "lm" (the config's language model, ULS on Flower) or "mean-estimation" (the synthetic
    task of `mean_estimation:` through the same loop). `auditor_knows_sampling`: also score with
    the cohorts and the noise regenerated from run.seed, as anyone can when the key is a function
    of it; default: exactly when `dp.reproducible` is true (then the audit shows what that costs)."""
    from fedsim.privacy import sabotage

    method = method.upper()
    if method not in ("ULS", "ELS"):
        raise ConfigError(f"--method must be uls or els, got {method.lower()!r}")
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if cfg.dp.epsilon is None or cfg.dp.noise_multiplier == 0:
        raise ConfigError("an audit needs a private run: dp.epsilon is unset or dp.noise_multiplier is 0")
    broken = sabotage.active_kinds()
    if broken and task == "lm" and method == "ULS" and cfg.simulation.backend != "inprocess":
        raise ConfigError("a sabotaged mechanism exists only in this process: audit it with simulation.backend=inprocess")
    if auditor_knows_sampling is None:
        auditor_knows_sampling = bool(cfg.dp.reproducible)
    acfg, num_real = audit_config(cfg, method, canaries, kind, task)
    t0 = time.time()
    observer = CanaryObserver(Canaries.from_config(acfg, num_real))
    if task == "mean-estimation":
        from fedsim.mean_estimation_run import run_mean_estimation

        run_dir, summary = run_mean_estimation(acfg, method, say, observer=observer)
    else:
        from fedsim.loop import run

        run_dir, summary = run(acfg, method, say, observer=observer)
    known = None
    if auditor_knows_sampling and observer.canaries.kind == "gradient":
        known = {"cohorts": regenerate_cohorts(acfg, observer.plan, observer.canaries, observer.steps),
                 "noise": regenerate_noise_projections(acfg, observer)}
    result = evaluate(observer, summary, acfg, known)
    result.update(method=method, task=task, run_dir=str(run_dir), sabotage=broken, wall_time_s=time.time() - t0,
                  run_wall_time_s=summary.get("wall_time_s"), auditor_knows_sampling=auditor_knows_sampling)
    write_audit(run_dir, result)
    return run_dir, result


def guess_counts(m: int) -> list[tuple[int, int]]:
    """The guess settings tried, fixed before any score is seen: k "included" guesses on the
    highest scores and k (or 0) "excluded" guesses on the lowest, k = f m / 2 for the fractions f
    of `statistics.DEFAULT_GUESS_FRACTIONS`. One-sided guesses matter under subsampling: an
    included canary never sampled scores like a held-out one, so the lowest scores are mixed."""
    from fedsim.auditing.statistics import DEFAULT_GUESS_FRACTIONS

    out: list[tuple[int, int]] = []
    for f in DEFAULT_GUESS_FRACTIONS:
        k = min(m // 2, max(1, round(f * m / 2)))
        for pair in ((k, k), (k, 0)):
            if pair not in out:
                out.append(pair)
    return out


def one_shot(scores: np.ndarray, included: np.ndarray, delta: float, reps: int = 200) -> dict | None:
    """The one-shot estimate (Andrew et al. 2024) of included vs held-out canaries' scores, with
    a 95% bootstrap interval (canaries resampled within each side, `reps` times, a public seed)
    and the estimate under one pooled variance, which the unequal-variance fit can overshoot
    when the two spreads differ by a few percent. None when a side has fewer than 2 canaries."""
    from fedsim.auditing import statistics as st

    a, b = scores[included], scores[~included]
    if a.size < 2 or b.size < 2:
        return None
    try:
        est = st.one_shot_epsilon(a, b, delta)
        pooled = float(np.sqrt((a.var() * a.size + b.var() * b.size) / (a.size + b.size)))
        equal = st.gaussian_pair_epsilon(float(b.mean()), pooled, float(a.mean()), pooled, delta)
        rng = np.random.default_rng(0)
        boot = [st.one_shot_epsilon(rng.choice(a, a.size), rng.choice(b, b.size), delta).epsilon for _ in range(reps)]
    except ValueError as exc:  # a degenerate fit (zero spread, an epsilon beyond the search)
        return {"epsilon": None, "error": str(exc)}
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"epsilon": est.epsilon, "interval_95": [float(lo), float(hi)], "epsilon_equal_variance": equal,
            "mu_included": est.mu1, "sigma_included": est.sigma1, "mu_held_out": est.mu0, "sigma_held_out": est.sigma0}


def evaluate(observer: CanaryObserver, summary: dict, cfg, known: dict | None = None) -> dict:
    """audit.json's content: the estimates against the reported epsilon, and the verdict."""
    from fedsim.auditing import statistics as st

    included, delta = observer.included, float(summary["delta"])
    reported = float(summary["epsilon"])
    scores = observer.scores(known)
    confidence = cfg.audit.confidence
    beta = 1.0 - confidence
    per_stat = {}
    guesses = guess_counts(included.size)
    for name, s in scores.items():  # the failure probability split evenly over the statistics
        res = st.one_run_audit(s, included, delta, confidence=1.0 - beta / len(scores), guess_counts=guesses)
        per_stat[name] = {"epsilon_lower_bound": res.epsilon_lower_bound, "guesses": res.guesses,
                          "correct": res.correct, "k_plus": res.k_plus, "k_minus": res.k_minus}
    best = max(per_stat, key=lambda k: per_stat[k]["epsilon_lower_bound"])
    lower = per_stat[best]["epsilon_lower_bound"]
    shots = {}
    if observer.canaries.kind == "gradient":
        for name in ("final-model", "all-iterates"):
            if name in scores and (est := one_shot(scores[name], included, delta)) is not None:
                shots[name] = est
    out = {
        "verdict": "consistent" if lower <= reported else "VIOLATION",
        "reported_epsilon": reported, "delta": delta, "target_epsilon": summary.get("target_epsilon"),
        "accountant": summary.get("accountant"), "noise": summary.get("noise"), "steps": summary.get("steps"),
        "q": summary.get("q"), "confidence": confidence,
        "lower_bound": {"epsilon": lower, "statistic": best, "confidence": confidence,
                        "method": "Steinke, Nasr and Jagielski 2023 (arXiv 2305.08846), one run; failure"
                                  " probability split over every statistic and guess count tried",
                        "by_statistic": per_stat},
        "one_shot": shots,
        "canaries": {**observer.canaries.describe(), "included": int(included.sum()),
                     "held_out": int((~included).sum())},
        "epsilon_cost": "the audit is a training run on the real users like any other: it spends the reported"
                        " epsilon on them (compose it with every other run on the same data). The canaries add"
                        " nothing to that: they are users of the population the plan was made for"
                        f" ({summary.get('num_users')} users, canaries included), covered as any user",
        "real_user_metrics": "canaries hold no held-out examples and are never counted as users or compute:"
                             " the evaluation set, cohort sizes and compute are the real users' alone",
        "diagnostics": {"note": "computed from unnoised data of the real users: outside the guarantee, never to be"
                                " published (as diagnostics.jsonl)",
                        "eval_loss_before": summary.get("eval_loss_before"),
                        "eval_loss_after": summary.get("eval_loss_after")},
        "scores": {k: v.tolist() for k, v in scores.items()}, "included": included.astype(int).tolist(),
    }
    if observer.canaries.kind == "text":
        ex_in = [st.exposure(float(loss), observer.reference_losses) for loss in observer.loss_after[included]]
        ex_out = [st.exposure(float(loss), observer.reference_losses) for loss in observer.loss_after[~included]]
        out["exposure"] = {"references": len(observer.reference_losses),
                           "max_possible": math.log2(len(observer.reference_losses) + 1),
                           "included_mean": float(np.mean(ex_in)) if ex_in else None,
                           "included_max": float(np.max(ex_in)) if ex_in else None,
                           "held_out_mean": float(np.mean(ex_out)) if ex_out else None}
    return out


def write_audit(run_dir: Path, result: dict) -> None:
    from fedsim.rundir import atomic_write_text

    atomic_write_text(Path(run_dir) / "audit.json", json.dumps(result, indent=1, default=float))
    plot_audit(Path(run_dir) / "audit.png", result)


def plot_audit(path: Path, result: dict) -> None:
    """Canary score distributions, included vs held out, one panel per statistic, with the estimates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["scores"])
    included = np.asarray(result["included"], dtype=bool)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = np.asarray(result["scores"][name])
        bins = np.histogram_bin_edges(s, bins=40)
        ax.hist(s[~included], bins=bins, alpha=0.6, label=f"held out ({(~included).sum()})", color="tab:blue")
        ax.hist(s[included], bins=bins, alpha=0.6, label=f"included ({included.sum()})", color="tab:orange")
        lb = result["lower_bound"]["by_statistic"][name]["epsilon_lower_bound"]
        text = f"lower bound {lb:.3g}"
        shot = result["one_shot"].get(name) or {}
        if shot.get("epsilon") is not None:
            lo, hi = shot["interval_95"]
            text += f"\none-shot {shot['epsilon']:.3g} [{lo:.3g}, {hi:.3g}]"
        ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score")
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("canaries")
    fig.suptitle(f"{result['method']} audit: reported epsilon {result['reported_epsilon']:.3g} (delta"
                 f" {result['delta']:.2g}); lower bound {result['lower_bound']['epsilon']:.3g} at"
                 f" {result['confidence']:.0%}: {result['verdict']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def verdict_line(result: dict) -> str:
    lb = result["lower_bound"]
    shots = ", ".join(f"{k} {v['epsilon']:.3g} [{v['interval_95'][0]:.3g}, {v['interval_95'][1]:.3g}]"
                      for k, v in result["one_shot"].items() if v.get("epsilon") is not None)
    return (f"{result['verdict']}: reported epsilon {result['reported_epsilon']:.3g}, one-run lower bound"
            f" {lb['epsilon']:.3g} ({lb['statistic']}, {lb['confidence']:.0%})"
            + (f", one-shot estimate {shots}" if shots else ""))


def main(argv: list[str]) -> int:
    """`fedsim audit CONFIG [--method uls|els] [--canaries M] [--kind gradient|text] [--task lm|mean-estimation]
    [--set K=V]`."""
    from fedsim.cli import ArgumentParser, _add_config_args
    from fedsim.config import load_config

    p = ArgumentParser(prog="fedsim audit", description="Insert canary users, train as configured (one run), and"
                       " compare what the model reveals about them with the reported epsilon.")
    _add_config_args(p)
    p.add_argument("--method", choices=["uls", "els"], default="uls")
    p.add_argument("--canaries", type=int, default=None, metavar="M",
                   help=f"canary users (default: audit.canaries, else {DEFAULT_CANARIES})")
    p.add_argument("--kind", choices=["gradient", "text"], default=None, help="default: audit.kind")
    p.add_argument("--task", choices=TASKS, default="lm",
                   help="lm: the config's language model (default); mean-estimation: the synthetic task of its"
                        " mean_estimation section (configs/mean_estimation.yaml), through the same training loop")
    args = p.parse_args(argv)
    run_dir, result = run_audit(load_config(args.config, args.overrides), args.method, args.canaries, args.kind,
                                task=args.task)
    print(verdict_line(result))
    print(f"audit: {run_dir / 'audit.json'}, {run_dir / 'audit.png'}")
    return 0 if result["verdict"] == "consistent" else 1
