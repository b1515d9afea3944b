"""`fedsim sweep CONFIG --grid KEY=V1,V2 [--grid ...] --seeds S`: a grid of comparisons.

Every (cell, seed) is one `fedsim compare` directory, DIR/cells/<cell>/seed-<s>/, run with
run.seed = the config's run.seed + s (model init, data split, ELS cap, batch order; the secret
randomness is fresh in every process anyway). Comparisons run in `--jobs` worker processes (one
process per comparison, its console output in the cell's log.txt); a progress bar counts runs.
`fedsim sweep --resume DIR` skips finished comparisons (compare.json) and resumes interrupted
ones from their checkpoints (a sweep checkpoints every round/step: `run.checkpoint_every` 0
becomes 1). The non-private reference has no epsilon: comparisons that differ only in
dp.epsilon / dp.delta share one reference run (`Sweep.reference_dirs`). Results: results.json, results.csv and results.parquet, one row per run with the
columns of `COLUMNS` plus one per grid key; `fedsim report DIR` draws them.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path

from fedsim.errors import ConfigError, FedsimError

#: every results row has these (and one column per grid key, after "method")
COLUMNS = ("cell", "seed", "method", "epsilon", "target_epsilon", "delta", "noise_multiplier", "noise",
           "accountant", "budget", "compute_planned", "compute_examples", "steps", "eval_loss_before",
           "eval_loss_after", "eval_perplexity_after", "wall_time_s", "run_dir", "status")
METHOD_LABELS = {"uls": "ULS", "els": "ELS", "non-private": "non-private"}


def parse_grid(items: list[str]) -> dict[str, list]:
    """["dp.epsilon=1,2", "compare.budget=4000"] -> {"dp.epsilon": [1.0, 2.0], ...} (YAML scalars)."""
    import yaml

    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r} must look like key.path=value1,value2")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        grid[key] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    return grid


def cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the first key varying slowest."""
    import itertools

    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]


def cell_name(cell: dict) -> str:
    """"dp.epsilon=1,compare.budget=4000" ("base" for an empty grid): a row's id and its directory name."""
    if not cell:
        return "base"
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items())


def _dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


class Sweep:
    """The plan of a sweep: its directory, base config, grid, seeds and methods (sweep.json)."""

    def __init__(self, out: Path, config: dict, overrides: list[str], grid: dict[str, list], seeds: int,
                 methods: list[str]):
        self.out, self.config, self.overrides = Path(out), config, list(overrides)
        self.grid, self.seeds, self.methods = grid, int(seeds), list(methods)

    @classmethod
    def load(cls, out: Path) -> Sweep:
        path = Path(out) / "sweep.json"
        if not path.is_file():
            raise FedsimError(f"{out} is not a fedsim sweep directory (no sweep.json)")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            return cls(out, meta["config"], meta["overrides"], meta["grid"], meta["seeds"], meta["methods"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FedsimError(f"{path}: not a valid sweep description ({exc})") from None

    def save(self) -> None:
        from fedsim.rundir import atomic_write_text

        atomic_write_text(self.out / "sweep.json", json.dumps(
            {"config": self.config, "overrides": self.overrides, "grid": self.grid, "seeds": self.seeds,
             "methods": self.methods}, indent=2) + "\n")

    def jobs(self) -> list[tuple[dict, int, Path]]:
        """(cell, seed, comparison directory) of every comparison, in grid order."""
        return [(c, s, self.out / "cells" / _dir_name(cell_name(c)) / f"seed-{s}")
                for c in cells(self.grid) for s in range(self.seeds)]

    def reference_dirs(self) -> dict[Path, Path]:
        """comparison directory -> the one whose non-private run it shares. The reference has no
        epsilon: cells that differ only in the privacy budget (dp.epsilon, dp.delta) and seed-for-seed
        share one reference run instead of repeating it."""
        if "non-private" not in self.methods:
            return {}
        owners: dict[str, Path] = {}
        out = {}
        for cell, seed, path in self.jobs():
            cfg = self.config_for(cell, seed)
            key = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"epsilon": None, "delta": None})}).model_dump_json()
            out[path] = owners.setdefault(key, path)
        return out

    def config_for(self, cell: dict, seed: int):
        """The validated config of one comparison (ConfigError names a bad key or value; paths given by
        --set or the grid are relative to the working directory, as in load_config)."""
        from fedsim.config import config_from_dict

        cfg = config_from_dict(self.config, [*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in cell.items()),
                                             f"compare.methods={json.dumps(self.methods)}"], f"sweep cell {cell_name(cell)}")
        run = {"seed": cfg.run.seed + seed, "checkpoint_every": cfg.run.checkpoint_every or 1}
        return cfg.model_copy(update={"run": cfg.run.model_copy(update=run)})

    def job_config(self, cell: dict, seed: int, path: Path, refs: dict[Path, Path]):
        """config_for, without the non-private run when another comparison runs the shared one."""
        cfg = self.config_for(cell, seed)
        if refs.get(path, path) == path:
            return cfg
        methods = [m for m in cfg.compare.methods if m != "non-private"]
        return cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"methods": methods})})


# -- one comparison, in its own process ----------------------------------------------------------------


def run_cell(config_json: str, out_dir: str, resume: bool) -> None:
    """Run (or resume) one comparison in this worker process, its console output appended to
    <out_dir>.log; exits 0 when it completed, 1 with the reason as the log's last line."""
    from fedsim.config import config_from_json

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "a", encoding="utf-8")  # noqa: SIM115 - this process's stdout until it exits
    os.dup2(log.fileno(), 1)  # Ray, Flower and the tables print here, not over the progress bar
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    code = 1
    try:
        from fedsim.comparison import run_compare

        run_compare(config_from_json(config_json), say=print, resume_dir=out if resume else None,
                    out_dir=None if resume else out)
        code = 0
    except FedsimError as exc:
        print(f"failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug: the other cells go on, the log has the traceback
        import traceback

        traceback.print_exc()
        print(f"failed: {type(exc).__name__}: {exc} (traceback in {out.name}.log)")
    finally:
        log.flush()
    sys.exit(code)


def cell_status(out: Path, exitcode: int | None) -> str:
    """"completed", or why not: the log's last line, or the signal that killed the process."""
    if exitcode == 0 and (out / "compare.json").is_file():
        return "completed"
    if exitcode is not None and exitcode < 0:
        return f"failed: the worker process was killed by signal {-exitcode} (resume with fedsim sweep --resume)"
    try:
        lines = (out.parent / f"{out.name}.log").read_text(encoding="utf-8").strip().splitlines()
        return lines[-1] if lines and lines[-1].startswith("failed:") else f"failed: exit code {exitcode}"
    except OSError:
        return f"failed: exit code {exitcode}"


# -- results -------------------------------------------------------------------------------------------------


def result_rows(sweep: Sweep) -> list[dict]:
    """One row per run of every comparison that finished (a missing one: status "missing")."""
    from fedsim.comparison import ROWS

    def read(path: Path) -> dict:
        path = path / "compare.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    refs = sweep.reference_dirs()
    rows = []
    for cell, seed, out in sweep.jobs():
        result = read(out)
        for name in sweep.methods:
            label, key, sub = ROWS[name]
            owner = refs.get(out, out) if name == "non-private" else out
            s = (result if owner == out else read(owner)).get(key) or {}
            cp = (result or {}).get("compute_plan", {})
            planned = cp.get("uls_expected") if s.get("method") == "ULS" else cp.get("els_expected")
            row = {"cell": cell_name(cell), "seed": seed, "method": label, **cell,
                   "epsilon": None if s.get("target_epsilon") is None else s.get("epsilon"),
                   **{k: s.get(k) for k in ("target_epsilon", "delta", "noise_multiplier", "noise", "accountant")},
                   "budget": (result or {}).get("budget"), "compute_planned": planned,
                   **{k: s.get(k) for k in ("compute_examples", "steps", "eval_loss_before", "eval_loss_after",
                                            "eval_perplexity_after", "wall_time_s")},
                   "run_dir": str((owner / sub).relative_to(sweep.out)),
                   "status": "missing" if not s else ("completed" if str(s.get("stop_reason", "")).startswith(
                       "completed") else str(s.get("stop_reason")))}
            rows.append(row)
    return rows


def write_results(sweep: Sweep, rows: list[dict]) -> None:
    """results.json (with the grid), results.csv and results.parquet, atomically."""
    from fedsim.rundir import _jsonable, atomic_write, atomic_write_text

    columns = [*COLUMNS[:3], *sweep.grid, *COLUMNS[3:]]
    atomic_write_text(sweep.out / "results.json", json.dumps(_jsonable(
        {"grid": sweep.grid, "seeds": sweep.seeds, "methods": [METHOD_LABELS[m] for m in sweep.methods],
         "columns": columns, "rows": rows}), indent=1) + "\n")

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows)

    atomic_write(sweep.out / "results.csv", write_csv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [None if r.get(c) is None else (r[c] if isinstance(r[c], (int, float)) else str(r[c]))
                          for r in rows] for c in columns})
    atomic_write(sweep.out / "results.parquet", lambda tmp: pq.write_table(table, str(tmp)))


def print_summary(sweep: Sweep, rows: list[dict]) -> None:
    """Per cell: each method's mean eval loss and 95% half-width over seeds, in 80 columns."""
    from fedsim.console import print_table
    from fedsim.report import t_interval

    labels = [METHOD_LABELS[m] for m in sweep.methods]
    table = []
    for cell in cells(sweep.grid):
        name = cell_name(cell)
        losses = [[r["eval_loss_after"] for r in rows if r["cell"] == name and r["method"] == label
                   and r["eval_loss_after"] is not None] for label in labels]
        short = ",".join(part.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + part.split("=", 1)[1]
                         for part in name.split(",")) if cell else name  # dp.epsilon=1 -> epsilon=1
        table.append([short, *("-" if not xs else f"{t_interval(xs)[0]:.4f}" + (
            "" if len(xs) < 2 else f" +-{t_interval(xs)[1]:.4f}") for xs in losses)])
    print_table(["cell", *labels], table, f"eval loss after training, mean +- 95% half-width over {sweep.seeds} seed(s)",
                right=tuple(labels), wrap=("cell",))


# -- running ------------------------------------------------------------------------------------------------------


def default_jobs(cfg) -> int:
    """Worker processes: one per core for in-process comparisons; one when ULS runs on Ray
    (a comparison's Ray actors already use every core)."""
    return 1 if cfg.simulation.backend == "ray" else max(1, os.cpu_count() or 1)


def run_sweep(sweep: Sweep, jobs: int, say=print) -> list[dict]:
    """Run every comparison not finished yet, `jobs` worker processes at a time (a process that
    dies fails its own comparison only); returns the results rows (also written to disk)."""
    import multiprocessing
    from multiprocessing.connection import wait

    from fedsim.progress import RunProgress

    todo, done = [], 0
    refs = sweep.reference_dirs()
    for cell, seed, out in sweep.jobs():
        cfg = sweep.job_config(cell, seed, out, refs)  # every cell is checked before anything runs
        if (out / "compare.json").is_file():
            done += 1
        else:
            todo.append((cell, seed, out, cfg))
    total, per = len(todo) + done, len(sweep.methods)
    if done:
        say(f"{done} of {total} comparisons finished before; skipped")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited Ray, torch or Flower state
    running: dict = {}  # process sentinel -> (process, cell, seed, out)
    failures = []
    with RunProgress(total * per, done * per, label="runs") as bar:
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    cell, seed, out, cfg = todo.pop(0)
                    proc = ctx.Process(target=run_cell, args=(cfg.model_dump_json(), str(out), out.exists()),
                                       name=f"fedsim-sweep {cell_name(cell)} seed {seed}")
                    proc.start()
                    running[proc.sentinel] = (proc, cell, seed, out)
                for sentinel in wait(list(running)):
                    proc, cell, seed, out = running.pop(sentinel)
                    proc.join()
                    status = cell_status(out, proc.exitcode)
                    done += 1
                    line = f"[{done}/{total}] {cell_name(cell)} seed {seed}: {status}"
                    if status != "completed":
                        failures.append(line)
                    bar.advance(per, line)
        except KeyboardInterrupt:
            for proc, *_ in running.values():  # a terminal's Ctrl-C reached them too; make sure
                proc.terminate()
            for proc, *_ in running.values():
                proc.join(timeout=30)
            raise
    rows = result_rows(sweep)
    write_results(sweep, rows)
    print_summary(sweep, rows)
    for line in failures:
        say(line)
    return rows


def start_sweep(config_path: str, overrides: list[str], grid: dict[str, list], seeds: int, methods: list[str],
                out: str | None) -> Sweep:
    """Check every cell's config, then create the sweep directory (never an existing one)."""

    from fedsim.config import load_config, read_config_file
    from fedsim.rundir import atomic_write_text, config_yaml, create_run_dir

    base = load_config(config_path, overrides)
    from fedsim.auditing.canaries import refuse_canaries

    refuse_canaries(base, "sweep")  # before the sweep directory exists
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown or not methods:
        raise ConfigError(f"--methods takes some of {', '.join(METHOD_LABELS)}; got {','.join(methods) or 'nothing'}")
    raw = read_config_file(config_path) if config_path else {}  # its relative paths made absolute, as load_config
    sweep = Sweep(Path(out or "."), raw, overrides, grid, seeds, methods)
    for cell, seed, _ in sweep.jobs():  # a bad grid key or value fails here, before anything is written
        cfg = sweep.config_for(cell, seed)
        if cfg.dp.epsilon is None:
            raise ConfigError(f"sweep cell {cell_name(cell)}: compare needs a privacy budget: set dp.epsilon")
    if out is None:
        sweep.out = create_run_dir(base.model_copy(update={"run": base.run.model_copy(update={"name": "sweep"})}))
    else:
        if sweep.out.exists() and any(sweep.out.iterdir()):
            raise FedsimError(f"{sweep.out} is not empty; continue a sweep with --resume {sweep.out}")
        sweep.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sweep.out / "config.yaml", config_yaml(base))
    sweep.save()
    return sweep


def main(argv: list[str]) -> int:
    from fedsim.cli import ArgumentParser

    p = ArgumentParser(prog="fedsim sweep", description="A grid of ULS vs ELS comparisons over seeds, resumable,"
                       " with one results table (results.csv/.json/.parquet).")
    p.add_argument("config", nargs="?", default="configs/default.yaml", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values, e.g. --grid dp.epsilon=1,2,4,8 (repeatable: the product)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (run.seed + 0, 1, ...; default: sweep.seeds)")
    p.add_argument("--methods", default=None, help="comma-separated: uls, els, non-private (default: compare.methods)")
    p.add_argument("--jobs", type=int, default=None,
                   help="comparisons run at once, one process each (default: 1 with the Ray backend, else one per core)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every cell (repeatable)")
    p.add_argument("--out", metavar="DIR", help="the sweep directory (default: <run.output_dir>/sweep, -2, ...)")
    p.add_argument("--resume", metavar="DIR", help="continue a sweep: skip finished comparisons, resume interrupted ones")
    args = p.parse_args(argv)
    if args.resume:
        if args.grid or args.overrides:
            raise ConfigError("--resume uses the sweep's own sweep.json; --grid and --set cannot change it")
        sweep = Sweep.load(Path(args.resume))
    else:
        from fedsim.config import load_config

        base = load_config(args.config, args.overrides)  # the config's sweep section: the grid when no --grid
        grid = parse_grid(args.grid) if args.grid else {k: list(v) for k, v in base.sweep.grid.items()}
        methods = args.methods.split(",") if args.methods is not None else base.compare.methods
        sweep = start_sweep(args.config, args.overrides, grid, args.seeds if args.seeds is not None else base.sweep.seeds,
                            [m.strip() for m in methods if m.strip()], args.out)
    first = sweep.config_for(cells(sweep.grid)[0], 0)
    jobs = args.jobs or first.sweep.jobs or default_jobs(first)
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    print(f"sweep directory: {sweep.out} ({len(sweep.jobs())} comparisons x {len(sweep.methods)} runs, {jobs} at a time)")
    t0 = time.time()
    try:
        rows = run_sweep(sweep, jobs)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: fedsim sweep --resume {sweep.out}", file=sys.stderr)
        return 130
    failed = sum(r["status"] != "completed" for r in rows)
    print(f"results: {sweep.out}/results.csv (.json, .parquet), {len(rows)} runs, {failed} not completed;"
          f" wall time {time.time() - t0:.0f}s")
    print(f"figures: fedsim report {sweep.out}")
    return 1 if failed else 0
