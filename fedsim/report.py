"""`fedsim report DIR [--html] [--out PATH] [--mean-estimation JSON]`: figures and a Markdown
(optionally HTML) report of a `fedsim sweep` directory (results.json) or of one `fedsim compare`
directory (compare.json, read as a sweep of one cell and one seed).

Writes into DIR/report/ (or --out): report.md, report.html with --html, and PNGs:
loss_vs_compute, winner_heatmap, epsilon_vs_steps, clipping, and mean_estimation when a
mean-estimation result (bench/mean_estimation_sweep.py) is given. Bad input is one FedsimError,
raised before anything is written.
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.errors import FedsimError

REFERENCE = "non-private"  # the method name of the non-private reference runs
COMPARED = ("ULS", "ELS")  # the winner is decided between these two
EPSILON_KEY, BUDGET_KEY = "dp.epsilon", "compare.budget"  # the grid keys that become the figures' axes
ACCOUNTANT_SECONDS = 20.0  # an accountant whose one evaluation takes longer is dropped from the epsilon figure
ACCOUNTING_SECONDS = 120.0  # total accounting time for the epsilon figure; later accountants are dropped
EPSILON_POINTS = 8  # step counts at which the other accountants recompute epsilon
LEVEL = 0.95
NOTE_DIAGNOSTICS = ("Eval losses (and clipped fractions) are simulation diagnostics computed on the private users'"
                    " held-out text: they are outside the differential-privacy guarantee and must not be published"
                    " from a real deployment. Epsilon, update norms and noise are released values.")


# --- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One completed run (a row of results.json)."""

    cell: str
    seed: int
    method: str
    epsilon_target: float | None  # the grid's dp.epsilon, else the row's target_epsilon
    budget: float  # the grid's compare.budget, else the row's budget
    extra: tuple  # ((grid key, value), ...) of the other grid keys
    order: tuple  # the cell's position in grid order
    loss_before: float
    loss_after: float
    epsilon_spent: float | None  # None: not private
    wall_time_s: float | None
    run_dir: Path

    @property
    def setting(self) -> tuple:
        """The panel of figure 1 and the row of figure 2."""
        return self.extra, self.epsilon_target

    @property
    def cell_key(self) -> tuple:
        return self.extra, self.epsilon_target, self.budget


@dataclass
class Results:
    root: Path
    source: str  # "results.json" or "compare.json"
    grid: dict
    seeds: int
    methods: list[str]
    runs: list[Run]
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (run, status) of the runs left out


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedsimError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    except OSError as exc:
        raise FedsimError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(obj, dict):
        raise FedsimError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _number(row: dict, key: str, where: str, optional: bool = False) -> float | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if value in ("inf", "Infinity"):  # how fedsim writes a non-finite epsilon
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FedsimError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _run_from_row(row: dict, grid: dict, root: Path, where: str) -> Run:
    if not isinstance(row, dict):
        raise FedsimError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [k for k in ("cell", "seed", "method", "eval_loss_before", "eval_loss_after", "run_dir", *grid)
               if k not in row]
    if missing:
        raise FedsimError(f"{where} lacks {', '.join(missing)}")
    order = tuple(values.index(row[k]) if row[k] in values else len(values) for k, values in grid.items())
    return Run(
        cell=str(row["cell"]), seed=int(_number(row, "seed", where)), method=str(row["method"]),
        epsilon_target=_number(row, EPSILON_KEY if EPSILON_KEY in grid else "target_epsilon", where, optional=True),
        budget=_number(row, BUDGET_KEY if BUDGET_KEY in grid else "budget", where),  # figure 1's x, figure 2's column
        extra=tuple((k, row[k]) for k in grid if k not in (EPSILON_KEY, BUDGET_KEY)), order=order,
        loss_before=_number(row, "eval_loss_before", where), loss_after=_number(row, "eval_loss_after", where),
        epsilon_spent=_number(row, "epsilon", where, optional=True),
        wall_time_s=_number(row, "wall_time_s", where, optional=True), run_dir=root / str(row["run_dir"]))


def _load_sweep(root: Path) -> Results:
    path = root / "results.json"
    data = _read_json(path)
    grid, rows = data.get("grid", {}), data.get("rows")
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise FedsimError(f"{path}: grid must map each key to a list of values")
    if not isinstance(rows, list):
        raise FedsimError(f"{path}: rows must be a list")
    runs, incomplete = [], []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if isinstance(row, dict) and row.get("status", "completed") != "completed":
            incomplete.append((f"{row.get('cell')} seed {row.get('seed')} {row.get('method')}", str(row["status"])))
            continue
        runs.append(_run_from_row(row, grid, root, where))
    if not runs:
        raise FedsimError(f"{path}: no completed runs")
    methods = data.get("methods") or list(dict.fromkeys(r.method for r in runs))
    seeds = _number(data, "seeds", str(path), optional=True) or len({r.seed for r in runs})
    return Results(root, "results.json", grid, int(seeds), list(methods), runs, incomplete)


def _load_compare(root: Path) -> Results:
    """A comparison directory as a sweep of one cell and one seed."""
    path = root / "compare.json"
    data = _read_json(path)
    if not any(isinstance(data.get(key), dict) for key in ("uls", "els", "reference")):
        raise FedsimError(f"{path}: has no uls, els or reference summary")
    grid = {EPSILON_KEY: [data.get("epsilon_target")], BUDGET_KEY: [data.get("budget")]}
    cell = f"{EPSILON_KEY}={data.get('epsilon_target')},{BUDGET_KEY}={data.get('budget')}"
    runs = []
    for key, method in (("uls", "ULS"), ("els", "ELS"), ("reference", REFERENCE)):  # compare.json's keys
        if not isinstance(data.get(key), dict):  # compare.methods may leave a method out
            continue
        # the recorded directory may be relative to where compare ran: prefer the one inside DIR
        recorded = Path(str(data.get(f"{key}_dir") or key))
        run_dir = root / recorded.name if (root / recorded.name).is_dir() else recorded
        row = {**data[key], "cell": cell, "seed": 0, "method": method, "run_dir": str(run_dir.resolve()),
               EPSILON_KEY: data.get("epsilon_target"), BUDGET_KEY: data.get("budget")}
        runs.append(_run_from_row(row, grid, root, f"{path}: {key}"))
    return Results(root, "compare.json", grid, 1, [r.method for r in runs], runs)


def load_results(root: Path) -> Results:
    """The runs of a sweep directory (results.json) or a comparison directory (compare.json)."""
    if not root.is_dir():
        raise FedsimError(f"{root} does not exist or is not a directory")
    if (root / "results.json").is_file():
        return _load_sweep(root)
    if (root / "compare.json").is_file():
        return _load_compare(root)
    raise FedsimError(f"{root} has no results.json (fedsim sweep) or compare.json (fedsim compare)")


def load_mean_estimation(path: Path) -> dict:
    """bench/mean_estimation_sweep.py's JSON, checked."""
    if not path.is_file():
        raise FedsimError(f"{path}: no such mean-estimation result")
    data = _read_json(path)
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise FedsimError(f"{path}: rows must be a non-empty list")
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        for key in ("heterogeneity", "budget", "epsilon"):
            _number(row, key, where)
        for method in ("uls", "els"):
            if not isinstance(row.get(method), dict):
                raise FedsimError(f"{where} lacks {method}")
            if not _number(row[method], "loss", f"{where}: {method}") > 0:  # drawn on log axes, compared as a ratio
                raise FedsimError(f"{where}: {method} loss must be positive")
            _number(row[method], "std", f"{where}: {method}")
    _number(data.get("config", {}), "seeds", f"{path}: config")
    return data


# --- statistics ------------------------------------------------------------------------------------


def t_half_width(std: float, n: int, level: float = LEVEL) -> float | None:
    """Half-width of the Student-t interval (n-1 df) for a mean of n values; None for n < 2."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n >= 2 else None


def t_interval(values) -> tuple[float, float | None]:
    """(mean, 95% half-width) of `values`; the half-width is None for a single value."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    return float(x.mean()), t_half_width(float(x.std(ddof=1)), len(x)) if len(x) >= 2 else None


@dataclass(frozen=True)
class Stat:
    """One method in one cell, over seeds."""

    mean: float
    half: float | None
    n: int
    epsilon: float | None  # mean spent; None: not private
    wall_time_s: float | None


@dataclass(frozen=True)
class Verdict:
    winner: str  # "ULS", "ELS" or "tie"
    margin: float  # mean ELS loss - mean ULS loss: > 0 means ULS is better
    overlap: bool | None  # the two 95% intervals overlap; None with a single seed
    # half-width of the 95% interval of the per-seed differences (ELS - ULS of the same seed): the
    # seeds share everything but the private training, so pairing removes what they have in common
    paired: float | None = None


def decide(uls: tuple[float, float | None], els: tuple[float, float | None]) -> Verdict:
    """Winner of (mean, half-width) losses: lower loss wins; intervals overlap when the gap is
    at most the sum of the half-widths."""
    margin = els[0] - uls[0]
    winner = "ULS" if margin > 0 else "ELS" if margin < 0 else "tie"
    overlap = None if uls[1] is None or els[1] is None else abs(margin) <= uls[1] + els[1]
    return Verdict(winner, margin, overlap)


def summarise(results: Results) -> dict[tuple, Stat]:
    """(cell key, method) -> Stat over the seeds."""
    groups: dict[tuple, list[Run]] = {}
    for run in results.runs:
        groups.setdefault((run.cell_key, run.method), []).append(run)

    def mean_of(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    out = {}
    for key, runs in groups.items():
        mean, half = t_interval([r.loss_after for r in runs])
        out[key] = Stat(mean, half, len(runs), mean_of(r.epsilon_spent for r in runs),
                        mean_of(r.wall_time_s for r in runs))
    return out


def _reference(stats: dict, cell_key: tuple) -> Stat | None:
    """The non-private reference of a cell; a reference run without a target epsilon serves every epsilon."""
    extra, _, budget = cell_key
    return stats.get((cell_key, REFERENCE)) or stats.get(((extra, None, budget), REFERENCE))


def verdicts(stats: dict[tuple, Stat], results: Results | None = None) -> dict[tuple, Verdict]:
    """Cell key -> ULS vs ELS verdict, for the cells that have both; with `results`, also the
    paired interval of the margin over the seeds both methods ran."""
    import dataclasses

    out = {}
    for ck, m in stats:
        if m != "ULS" or (ck, "ELS") not in stats:
            continue
        v = decide((stats[ck, "ULS"].mean, stats[ck, "ULS"].half), (stats[ck, "ELS"].mean, stats[ck, "ELS"].half))
        if results is not None:
            by_seed = {(r.method, r.seed): r.loss_after for r in results.runs if r.cell_key == ck}
            diffs = [by_seed["ELS", seed] - by_seed["ULS", seed] for (method, seed) in by_seed
                     if method == "ULS" and ("ELS", seed) in by_seed]
            if len(diffs) >= 2:
                v = dataclasses.replace(v, paired=t_interval(diffs)[1])
        out[ck] = v
    return out


# --- figures ---------------------------------------------------------------------------------------

COLOURS = {"ULS": "tab:blue", "ELS": "tab:orange", REFERENCE: "tab:green"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "n/a"
    return "∞" if math.isinf(x) else format(x, spec)


def _setting_label(setting: tuple) -> str:
    extra, eps = setting
    return ", ".join([f"target ε = {_fmt(eps)}", *(f"{k} = {v}" for k, v in extra)])


def _settings_and_budgets(results: Results) -> tuple[list[tuple], list[float]]:
    """The (extra, epsilon) settings in grid order (smallest epsilon first) and the budgets, ascending."""
    def grid_order(setting):
        extra, eps = setting
        positions = tuple(results.grid[k].index(v) if v in results.grid[k] else len(results.grid[k]) for k, v in extra)
        return positions, _inf(eps)

    # a reference run without a target epsilon is drawn in every epsilon's panel, not in one of its own
    settings = {r.setting for r in results.runs if r.method != REFERENCE or r.epsilon_target is not None}
    return sorted(settings, key=grid_order), sorted({r.budget for r in results.runs})


def _inf(x: float | None) -> float:
    return math.inf if x is None else x


def _short(x: float) -> str:
    """4000 -> 4k, 1500000 -> 1.5M: tick labels that fit side by side."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def _budget_axis(ax, budgets: list[float], log: bool) -> None:
    """Ticks at the budgets themselves: matplotlib's log-axis minor labels collide (3x10^4 4x10^4)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    if log:
        ax.set_xscale("log")
    ax.set_xticks(budgets, [_short(b) for b in budgets])
    if len(budgets) == 1:  # else the autoscaled limits push the dodged points to the panel's edges
        ax.set_xlim(budgets[0] * 0.85, budgets[0] * 1.15)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_y(ax) -> None:
    """Log y labelled at 1, 2, 5 x 10^k only: the default labels every minor tick on a short axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.0e}".replace("e-0", "e-").replace("e+0", "e")))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_loss_vs_compute(results: Results, stats: dict, path: Path) -> None:
    """Figure 1: eval loss after training vs compute budget, one panel per target epsilon."""
    plt = _pyplot()
    settings, budgets = _settings_and_budgets(results)
    log_x = len(budgets) > 1 and budgets[-1] > 4 * budgets[0]
    ncols = min(len(settings), 3)
    nrows = math.ceil(len(settings) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.6), squeeze=False,
                             sharey=True, layout="constrained")
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    handles = {}
    for ax, setting in zip(axes.flat, settings):
        before = [r.loss_before for r in results.runs if r.setting == setting]
        line = ax.axhline(sum(before) / len(before), color="grey", lw=0.8)
        handles["eval loss before training"] = line
        ref = [(b, s) for b in budgets if (s := _reference(stats, (*setting, b)))]
        if ref:
            xs, ss = [b for b, _ in ref], [s for _, s in ref]
            lo = [s.mean - (s.half or 0) for s in ss]
            hi = [s.mean + (s.half or 0) for s in ss]
            n = max(s.n for s in ss)
            label = f"{REFERENCE} (mean of {n} seeds, 95% interval)" if n > 1 else f"{REFERENCE} (1 seed)"
            if len(xs) == 1:  # one budget: a horizontal reference across the panel
                handles[label] = ax.axhline(ss[0].mean, color=COLOURS[REFERENCE], ls="--")
                ax.axhspan(lo[0], hi[0], color=COLOURS[REFERENCE], alpha=0.15, lw=0)
            else:
                handles[label] = ax.plot(xs, [s.mean for s in ss], color=COLOURS[REFERENCE], ls="--")[0]
                ax.fill_between(xs, lo, hi, color=COLOURS[REFERENCE], alpha=0.15, lw=0)
        for i, method in enumerate(COMPARED):
            pts = [(b, s) for b in budgets if (s := stats.get(((*setting, b), method)))]
            if not pts:
                continue
            n = max(s.n for _, s in pts)
            label = f"{method} (mean of {n} seeds, 95% t-interval)" if n > 1 else f"{method} (1 seed)"
            dodge = 1 + 0.03 * (2 * i - 1)  # side by side, so the intervals do not hide each other
            handles[label] = ax.errorbar([b * dodge for b, _ in pts], [s.mean for _, s in pts],
                                         yerr=[s.half or 0 for _, s in pts], color=COLOURS.get(method), marker="o",
                                         capsize=3, ms=4)
        _budget_axis(ax, budgets, log_x)
        ax.set_title(_setting_label(setting), fontsize=10)
        ax.set_xlabel("compute budget (example gradients)")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("eval loss after training")
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_winner_heatmap(results: Results, verdict_of: dict[tuple, Verdict], path: Path) -> None:
    """Figure 2: rows = target epsilon, columns = budget, colour = mean ELS - mean ULS loss."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    settings, budgets = _settings_and_budgets(results)
    margin = np.full((len(settings), len(budgets)), np.nan)
    for (extra, eps, budget), v in verdict_of.items():
        if (extra, eps) in settings and budget in budgets:
            margin[settings.index((extra, eps)), budgets.index(budget)] = v.margin
    scale = float(np.nanmax(np.abs(margin))) if np.isfinite(margin).any() else 1.0
    scale = scale or 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 2.4 + 1.9 * len(budgets)), 1.4 + 1.0 * len(settings)), layout="constrained")
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(margin), cmap=cmap, norm=TwoSlopeNorm(0.0, -scale, scale), aspect="auto")
    for i, setting in enumerate(settings):
        for j, budget in enumerate(budgets):
            v = verdict_of.get((*setting, budget))
            if v is None:
                ax.text(j, i, "no data", ha="center", va="center", fontsize=8)
                continue
            overlap = "n/a (1 seed)" if v.overlap is None else "overlap" if v.overlap else "no overlap"
            paired = "" if v.paired is None else f"\npaired ±{v.paired:.2g}"
            ax.text(j, i, f"{v.winner}\n{v.margin:+.3g}{paired}\n{overlap}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v.margin) > 0.6 * scale else "black")
    ax.set_xticks(range(len(budgets)), [f"{b:,.0f}" for b in budgets])
    ax.set_yticks(range(len(settings)), [_setting_label(s).replace("target ε = ", "ε=") for s in settings])
    ax.set_xlabel("compute budget (example gradients)")
    ax.set_ylabel("target epsilon")
    ax.set_title("winner by mean eval loss (margin = ELS − ULS)", fontsize=10)
    fig.colorbar(image, ax=ax, label="ELS − ULS eval loss\n(> 0: ULS better)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def representative_runs(results: Results) -> dict[str, Run]:
    """Per private method: its run in the first cell (grid order) with the smallest target epsilon, lowest seed."""
    reps: dict[str, Run] = {}
    for run in sorted(results.runs, key=lambda r: (_inf(r.epsilon_target), r.order, r.seed)):
        if run.method != REFERENCE:
            reps.setdefault(run.method, run)
    return {m: reps[m] for m in [*results.methods, *reps] if m in reps}


def _summary(run: Run) -> dict:
    try:  # a missing or broken summary costs the run its recomputed epsilons, not the report
        return _read_json(run.run_dir / "summary.json")
    except FedsimError:
        return {}


def run_rows(reps: dict[str, Run], notes: list[str]) -> dict[str, tuple[list[dict], list[dict]]]:
    """Method -> (metrics, diagnostics) rows of its representative run; an unreadable file costs
    that run its panels, not the report."""
    from fedsim.rundir import read_diagnostics, read_metrics

    out = {}
    for method, run in reps.items():
        try:
            out[method] = read_metrics(run.run_dir), read_diagnostics(run.run_dir)
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{method}: cannot read the rows of {run.run_dir} ({exc})")
            out[method] = [], []
    return out


def recomputed_epsilons(run: Run, notes: list[str], deadline: float) -> dict[str, list[tuple[int, float]]]:
    """Accountant -> [(round/step, epsilon)] at ~EPSILON_POINTS step counts, from the run's ledger,
    for every accountant but the run's own that supports its releases."""
    import numpy as np
    from dp_accounting.privacy_accountant import UnsupportedEventError

    from fedsim.privacy.accounting import (
        accountant_names,
        epsilon,
        make_accountant,
        options_for,
    )
    from fedsim.privacy.ledger import PrivacyLedger, compress

    summary = _summary(run)
    ledger_path = run.run_dir / "privacy_ledger.jsonl"
    if not ledger_path.is_file() or "delta" not in summary:
        notes.append(f"{run.method}: no privacy ledger or summary in {run.run_dir}; epsilon not recomputed")
        return {}
    try:
        ledger = PrivacyLedger(ledger_path)
        events, steps = ledger.events(), [int(e["step"]) for e in ledger.entries]
    except (FedsimError, KeyError, TypeError, ValueError) as exc:  # a torn line, an entry without step/event
        notes.append(f"{run.method}: unreadable ledger {ledger_path} ({exc}); epsilon not recomputed")
        return {}
    if not events:
        return {}
    marks = sorted({steps[int(i) - 1] for i in np.linspace(1, len(steps), EPSILON_POINTS).round()}, reverse=True)
    options = summary.get("accountant_options") or {}
    curves = {}
    for name in accountant_names():
        if name == summary.get("accountant"):
            continue  # its curve is the run's own epsilon column
        opts = options_for(name, options)  # the run's options (e.g. its PLD discretisation) where it takes them
        if not make_accountant(name, **opts).supports(compress(events)):
            continue
        if time.perf_counter() > deadline:
            notes.append(f"{run.method}: {name} skipped (the epsilon figure's {ACCOUNTING_SECONDS:g} s"
                         " accounting budget was spent)")
            continue
        points = []
        for mark in marks:  # the longest prefix first: usually the slowest, so a slow accountant is dropped early
            prefix = compress([e for e, s in zip(events, steps) if s <= mark])
            t0 = time.perf_counter()
            try:
                eps = epsilon(name, prefix, float(summary["delta"]), **opts)
            except (UnsupportedEventError, ValueError, FloatingPointError) as exc:
                notes.append(f"{run.method}: {name} failed at {mark} ({type(exc).__name__}: {exc})")
                points = []
                break
            seconds = time.perf_counter() - t0
            if seconds > ACCOUNTANT_SECONDS:
                notes.append(f"{run.method}: {name} skipped (one evaluation took {seconds:.1f} s"
                             f" > {ACCOUNTANT_SECONDS:g} s)")
                points = []
                break
            points.append((mark, eps))
        if points:
            curves[name] = sorted(points)
    return curves


def _step_key(rows: list[dict]) -> str:
    return "round" if rows and "round" in rows[0] else "step"


def plot_epsilon_vs_steps(reps: dict[str, Run], rows: dict, path: Path, notes: list[str]) -> bool:
    """Figure 3: epsilon spent vs round/step for each accountant, one panel per representative run.
    False (nothing written) when no representative run has metrics."""
    from matplotlib.ticker import MaxNLocator

    panels = [(m, r, rows[m][0]) for m, r in reps.items() if any("epsilon" in row for row in rows[m][0])]
    if not panels:
        notes.append("epsilon_vs_steps.png not drawn: no representative run has a metrics.jsonl")
        return False
    plt = _pyplot()
    deadline = time.perf_counter() + ACCOUNTING_SECONDS
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False, layout="constrained")
    for ax, (method, run, metrics) in zip(axes[0], panels):
        key, own = _step_key(metrics), _summary(run).get("accountant", "run's accountant")
        spent = [r for r in metrics if isinstance(r.get("epsilon"), (int, float))]
        ax.plot([r[key] for r in spent], [r["epsilon"] for r in spent], color="black", lw=1.5,
                label=f"{own} (the run's own, metrics.jsonl)")
        # hollow markers shrinking in turn: accountants that agree stay visible as nested rings
        for i, (name, pts) in enumerate(recomputed_epsilons(run, notes, deadline).items()):
            ax.plot(*zip(*pts), marker="osD^v"[i % 5], ms=11 - 2 * (i % 5), mfc="none", ls="--", lw=1,
                    label=f"{name} (recomputed from the ledger)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{method}: {run.cell}, seed {run.seed}", fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel("epsilon spent")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_clipping(reps: dict[str, Run], rows: dict, path: Path, notes: list[str]) -> bool:
    """Figure 4: clipped fraction (diagnostic) and released update norm vs round/step, one panel
    per representative run. False (nothing written) when no representative run has rows."""
    from matplotlib.ticker import MaxNLocator

    panels = [(m, r, *rows[m]) for m, r in reps.items() if rows[m][0] or rows[m][1]]
    if not panels:
        notes.append("clipping.png not drawn: no representative run has metrics.jsonl or diagnostics.jsonl")
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False, layout="constrained")
    for ax, (method, run, metrics, diagnostics) in zip(axes[0], panels):
        key = _step_key(metrics or diagnostics)
        clipped = [(r[key], r["clipped_frac"]) for r in diagnostics if r.get("clipped_frac") is not None]
        norms = [(r[key], r["update_norm"]) for r in metrics if r.get("update_norm") is not None]
        lines = []
        if clipped:
            lines += ax.plot(*zip(*clipped), marker="o", ms=4, color="tab:red",
                             label="clipped fraction (diagnostic)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(f"clipped fraction of {'users' if key == 'round' else 'examples'}")
        if norms:
            right = ax.twinx()
            lines += right.plot(*zip(*norms), marker="s", ms=4, color="tab:purple",
                                label="update norm (released, noisy)")
            # from 0, with headroom: autoscaling blows a 1% wiggle up to the full height, and the top
            # would put the norms on the frame, where a clipped fraction of 1 also sits
            right.set_ylim(0, 1.25 * max(v for _, v in norms))
            right.set_ylabel("update norm")
        ax.set_xlabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{method}: {run.cell}, seed {run.seed}", fontsize=9)
        ax.grid(alpha=0.3)
        # below the axes: the two series share the panel, a legend inside would cover one of them
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_mean_estimation(data: dict, path: Path) -> None:
    """Figure 5: the synthetic mean-estimation study: excess loss vs budget per epsilon, one row per
    heterogeneity, and that row's winner heatmap (colour: log2 of ELS/ULS excess loss)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    rows, n = data["rows"], int(data["config"]["seeds"])
    hets = sorted({r["heterogeneity"] for r in rows})
    epss = sorted({r["epsilon"] for r in rows})
    budgets = sorted({r["budget"] for r in rows})
    at = {(r["heterogeneity"], r["epsilon"], r["budget"]): r for r in rows}
    scale = max(abs(math.log2(r["els"]["loss"] / r["uls"]["loss"])) for r in rows) or 1.0
    fig, axes = plt.subplots(len(hets), len(epss) + 1, figsize=(3.6 * (len(epss) + 1), 3.3 * len(hets) + 0.5),
                             squeeze=False, layout="constrained")
    handles = {}
    for hi, het in enumerate(hets):
        for ei, eps in enumerate(epss):
            ax = axes[hi, ei]
            if ei:  # one y scale per row: the epsilons of a heterogeneity side by side
                ax.sharey(axes[hi, 0])
            for i, method in enumerate(("uls", "els")):
                pts = [at[het, eps, b][method] for b in budgets if (het, eps, b) in at]
                xs = [b * (1 + 0.04 * (2 * i - 1)) for b in budgets if (het, eps, b) in at]
                half = [t_half_width(p["std"], n) or 0 for p in pts]
                label = f"{method.upper()} (mean of {n} seeds, 95% t-interval)" if n > 1 else f"{method.upper()} (1 seed)"
                handles[label] = ax.errorbar(xs, [p["loss"] for p in pts], yerr=half, marker="o", ms=4, capsize=3,
                                             color=COLOURS[method.upper()])
            _budget_axis(ax, budgets, log=True)
            _log_y(ax)
            ax.set_title(f"heterogeneity {het:g}, ε = {eps:g}", fontsize=9)
            ax.set_xlabel("compute budget")
            ax.grid(alpha=0.3, which="both")
        axes[hi, 0].set_ylabel("excess loss")
        ax = axes[hi, -1]
        grid = np.full((len(epss), len(budgets)), np.nan)
        for ei, eps in enumerate(epss):
            for bi, b in enumerate(budgets):
                r = at.get((het, eps, b))
                if r is None:
                    continue
                grid[ei, bi] = math.log2(r["els"]["loss"] / r["uls"]["loss"])
                v = decide((r["uls"]["loss"], t_half_width(r["uls"]["std"], n)),
                           (r["els"]["loss"], t_half_width(r["els"]["std"], n)))
                overlap = "n/a" if v.overlap is None else "overlap" if v.overlap else "no overlap"
                ax.text(bi, ei, f"{v.winner}\n×{r['els']['loss'] / r['uls']['loss']:.2f}\n{overlap}", ha="center",
                        va="center", fontsize=7, color="white" if abs(grid[ei, bi]) > 0.6 * scale else "black")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", norm=TwoSlopeNorm(0.0, -scale, scale),
                          aspect="auto")
        ax.set_xticks(range(len(budgets)), [f"{b:,.0f}" for b in budgets], fontsize=7)
        ax.set_yticks(range(len(epss)), [f"ε={e:g}" for e in epss])
        ax.set_title(f"heterogeneity {het:g}: ELS/ULS excess loss", fontsize=9)
        fig.colorbar(image, ax=ax, label="log2(ELS / ULS)\n(> 0: ULS better)", shrink=0.9)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the report -------------------------------------------------------------------------------------
# A report is a list of blocks, rendered to Markdown and HTML by the two writers below:
# ("h1" | "h2" | "p", text), ("list", items), ("table", header, rows), ("figure", file name, caption).


def _blocks(results: Results, stats: dict, verdict_of: dict, figures: list[tuple[str, str]], notes: list[str],
            mean_estimation: Path | None) -> list[tuple]:
    label: dict[tuple, str] = {}  # cell key -> the cell's name, in grid order
    for run in sorted(results.runs, key=lambda r: r.order):
        label.setdefault(run.cell_key, run.cell)
    blocks = [("h1", f"fedsim report: {results.root.name}"),
              ("p", (f"Source: {results.root / results.source}. Seeds: {results.seeds}. Methods: "
                     f"{', '.join(results.methods)}. Intervals are 95% Student-t intervals over seeds (seeds − 1"
                     " degrees of freedom); with one seed there is no interval.")),
              ("table", ["grid key", "values"], [[k, ", ".join(map(str, v))] for k, v in results.grid.items()]),
              ("p", NOTE_DIAGNOSTICS), ("h2", "Results")]
    methods = [*results.methods, *sorted({m for _, m in stats} - set(results.methods))]
    table = []
    for ck, cell in label.items():
        for method in methods:
            s = stats.get((ck, method))
            if s is not None:
                eps = "∞ (no DP)" if s.epsilon is None else _fmt(s.epsilon)
                table.append([cell, method, f"{s.mean:.4f} ± {_fmt(s.half, '.4f')}", str(s.n), eps,
                              _fmt(s.wall_time_s, ".1f")])
    blocks.append(("table", ["cell", "method", "eval loss after (mean ± 95% half-width)", "seeds",
                             "epsilon spent (mean)", "wall time s (mean)"], table))
    blocks.append(("h2", "Winner per cell"))
    blocks.append(("p", ("Margin = mean ELS eval loss − mean ULS eval loss: positive means ULS reached the lower"
                         " loss. Paired: the 95% interval of the per-seed differences (the seeds share the"
                         " data, the evaluation set and the pre-trained model); resolved when it excludes 0."
                         " Overlap: whether the two methods' own 95% intervals overlap (n/a with one seed).")))
    blocks.append(("table", ["cell", "winner", "margin (ELS − ULS)", "paired 95% half-width", "resolved (paired)",
                             "95% intervals overlap"],
                   [[label[ck], v.winner, f"{v.margin:+.4f}", "n/a" if v.paired is None else f"{v.paired:.4f}",
                     "n/a" if v.paired is None else "yes" if abs(v.margin) > v.paired else "no",
                     "n/a" if v.overlap is None else "yes" if v.overlap else "no"]
                    for ck in label if (v := verdict_of.get(ck))]))
    blocks.append(("h2", "Figures"))
    blocks += [("figure", name, caption) for name, caption in figures]
    if mean_estimation is not None:
        blocks.append(("p", f"Mean-estimation result: {mean_estimation}."))
    if results.incomplete:
        blocks.append(("h2", "Runs left out (not completed)"))
        blocks.append(("table", ["run", "status"], [list(r) for r in results.incomplete]))
    if notes:
        blocks.append(("h2", "Notes"))
        blocks.append(("list", notes))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}")
        elif kind == "h2":
            out.append(f"## {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            header, rows = rest
            numeric = [bool(rows) and all(str(r[i])[:1] in "+-0123456789∞" for r in rows) for i in range(len(header))]
            out.append("\n".join(["| " + " | ".join(map(_md_cell, header)) + " |",
                                  "|" + "|".join(" ---: " if num else " --- " for num in numeric) + "|",
                                  *("| " + " | ".join(map(_md_cell, r)) + " |" for r in rows)]))
        elif kind == "figure":
            name, caption = rest
            out.append(f"![{name}]({name})\n\n**{name}.** {caption}")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "list":
            body.append("<ul>\n" + "".join(f"<li>{e(item)}</li>\n" for item in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            body.append("<table>\n<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>\n"
                        + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>\n" for r in rows)
                        + "</table>")
        elif kind == "figure":
            name, caption = rest
            body.append(f'<figure><img src="{e(name)}" alt="{e(name)}">'
                        f"<figcaption><b>{e(name)}.</b> {e(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em}"
             "th{background:#eee}img{max-width:100%}figure{margin:1.5em 0}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


CAPTIONS = {
    "loss_vs_compute.png": (
        "Eval loss after training against the compute budget (per-example gradient evaluations), one panel per"
        " target epsilon. ULS and ELS: mean over seeds with its 95% Student-t interval (the two are drawn slightly"
        " apart along x so the intervals stay visible). Dashed: the non-private reference with its band; thin grey:"
        " the eval loss before training."),
    "winner_heatmap.png": (
        "The summary view: one cell per (target epsilon, budget), coloured by the margin mean ELS loss − mean ULS"
        " loss (blue: ULS better, red: ELS better, white: even), annotated with the winner, the margin, and whether"
        " the two 95% intervals overlap (then these seeds do not resolve the winner)."),
    "epsilon_vs_steps.png": (
        "Epsilon spent against rounds (ULS) or steps (ELS) for one run per method ({reps}). Solid: the epsilon the"
        " run reported under its own accountant; dashed: epsilon recomputed from the run's privacy ledger by every"
        " other accountant that supports its releases, at up to {points} step counts (fewer accountants support"
        " the ELS mixture release)."),
    "clipping.png": (
        "For the same runs ({reps}): the fraction of clipped updates (users for ULS, examples for ELS; a"
        " diagnostic outside the guarantee) and the norm of the released noisy update, against rounds or steps."),
    "mean_estimation.png": (
        "The synthetic mean-estimation study: excess loss against compute budget per epsilon (log axes), one row"
        " per user heterogeneity, mean over seeds with 95% t-intervals from the recorded standard deviations; the"
        " last panel of each row is its winner map, coloured by log2 of the ELS/ULS excess-loss ratio and"
        " annotated with winner, ratio and overlap (n/a with one seed)."),
}


def write_report(root: Path, out: Path, as_html: bool = False, mean_estimation: Path | None = None) -> list[Path]:
    """Read `root`, write the figures and report.md (report.html) into `out`; returns the files written."""
    results = load_results(root)
    mean_data = load_mean_estimation(mean_estimation) if mean_estimation is not None else None
    stats = summarise(results)
    verdict_of = verdicts(stats, results)
    reps = representative_runs(results)
    rep_text = "; ".join(f"{m}: cell {r.cell}, seed {r.seed}" for m, r in reps.items())
    if out.exists() and not out.is_dir():
        raise FedsimError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)  # input checked: from here on, files are written
    notes: list[str] = []
    names = ["loss_vs_compute.png", "winner_heatmap.png"]
    plot_loss_vs_compute(results, stats, out / names[0])
    plot_winner_heatmap(results, verdict_of, out / names[1])
    rows = run_rows(reps, notes)
    if plot_epsilon_vs_steps(reps, rows, out / "epsilon_vs_steps.png", notes):
        names.append("epsilon_vs_steps.png")
    if plot_clipping(reps, rows, out / "clipping.png", notes):
        names.append("clipping.png")
    if mean_data is not None:
        plot_mean_estimation(mean_data, out / "mean_estimation.png")
        names.append("mean_estimation.png")
    figures = [(name, CAPTIONS[name].format(reps=rep_text, points=EPSILON_POINTS)) for name in names]
    blocks = _blocks(results, stats, verdict_of, figures, notes, mean_estimation)
    written = [out / name for name, _ in figures]
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    written.append(out / "report.md")
    if as_html:
        (out / "report.html").write_text(to_html(blocks, f"fedsim report: {root.name}"), encoding="utf-8")
        written.append(out / "report.html")
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedsim report`."""
    from fedsim.cli import ArgumentParser

    p = ArgumentParser(prog="fedsim report", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a fedsim sweep directory (results.json) or compare directory (compare.json)")
    p.add_argument("--html", action="store_true", help="also write report.html")
    p.add_argument("--out", help="output directory (default: DIR/report)")
    p.add_argument("--mean-estimation", metavar="JSON",
                   help="add the synthetic mean-estimation study (bench/mean_estimation_sweep.py's JSON)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    root = Path(args.dir)
    out = Path(args.out) if args.out else root / "report"
    written = write_report(root, out, args.html, Path(args.mean_estimation) if args.mean_estimation else None)
    print(f"report written to {out}:")
    for path in written:
        print(f"  {path}")
    return 0
