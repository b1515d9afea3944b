"""A StackOverflow-scale population end to end: `fedsim run` ULS and ELS on configs/stackoverflow_like.yaml.

    python bench/stackoverflow_scale.py                          # 342,477 users (the file is made if missing)
    python bench/stackoverflow_scale.py --users 342477 34248     # and a 10x smaller population: is memory flat?
    python bench/stackoverflow_scale.py --methods els --set els.steps=5

For each population: the StackOverflow-shaped Parquet file (bench/make_stackoverflow_like.py, made if
missing) and its files-store index (built once here and timed, so the runs open it cached), then
`fedsim run` ULS and ELS, each a fresh process under a process-tree RSS sampler (psutil every 0.1 s,
as bench/peak_rss.py: the driver, Ray's GCS, raylet and workers summed). Reported per run:

- `first_round_s`: from the command's start to the console line of round / step 1 (imports, the
  store, planning and calibration, the model, Ray and its workers, the evaluation before training);
- `s_per_round`: the diagnostics' per-round `time`, median over the rounds after the first;
- `users_per_s`: ULS, users trained in a round over its time; ELS, examples in a step over its time
  (ELS samples examples: with k = 4 of ~1M kept posts nearly every example is a different user's,
  and `els_distinct_users_per_step` gives the expected number of distinct users a step);
- `peak_tree_rss_mb`, `wall_s` (the whole command), epsilon and the eval loss before / after.

Prints one JSON object, also written to bench/out/stackoverflow_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stackoverflow_like.yaml"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from peak_rss import watch_peak


def data_file(users: int) -> Path:
    from fedsim.rundir import cache_dir

    name = "stackoverflow_like.parquet" if users == 342_477 else f"stackoverflow_like_{users}.parquet"
    return cache_dir("bench", name)


def ensure_data(users: int) -> dict:
    """The Parquet file (made if missing) and its index (built here if not cached): what they cost."""
    path = data_file(users)
    out: dict = {"path": str(path)}
    if not path.is_file():
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "make_stackoverflow_like.py"), "--users", str(users),
                            "--out", str(path)], capture_output=True, text=True, check=True)
        out["generated"] = json.loads(p.stdout)
    from fedsim.data.files import FileUserStore

    t0 = time.perf_counter()
    store = FileUserStore(path, min_examples=1)  # the config's data keys: the runs open this index cached
    out.update(index_built=store.built, index_seconds=round(time.perf_counter() - t0, 2), users=store.num_users,
               posts=int(store.stats["examples"]))
    return out


def run_measured(argv: list[str], poll: float = 0.1) -> dict:
    """Run a command; (console lines with their times since start, peak summed RSS of its tree, wall, exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, peak_procs = watch_peak(proc, poll)
    rc = proc.wait()
    reader.join(timeout=10)
    return {"lines": lines, "peak_tree_rss_mb": round(peak / 2**20, 1), "processes_at_peak": peak_procs,
            "wall_s": round(time.perf_counter() - t0, 1), "exit": rc}


def one_run(method: str, path: Path, out_dir: Path, extra: list[str]) -> dict:
    name = f"{method}-{path.stem}"
    argv = [sys.executable, "-m", "fedsim.cli", "run", str(CONFIG), "--method", method,
            "--set", f"data.path={path}", "--set", f"run.output_dir={out_dir}", "--set", f"run.name={name}"]
    for s in extra:
        argv += ["--set", s]
    m = run_measured(argv)
    if m["exit"] != 0:
        raise RuntimeError(f"{method} failed (exit {m['exit']}):\n" + "\n".join(t for _, t in m["lines"][-30:]))
    key = "round" if method == "uls" else "step"
    first = next(t for t, line in m["lines"] if f"{method.upper()} {key} 1/" in line)
    run_dir = out_dir / name
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "diagnostics.jsonl").read_text().splitlines()[1:] if x.strip()]
    rows = [r for r in rows if r.get(key, 0) >= 1]
    times = [r["time"] for r in rows]
    work = [r["users"] if method == "uls" else r["batch"] for r in rows]
    later = list(zip(times, work))[1:] or list(zip(times, work))
    return {
        "method": method.upper(), "first_round_s": round(first, 1),
        "round_times_s": [round(t, 2) for t in times], "s_per_round": round(statistics.median(t for t, _ in later), 2),
        "per_round": work, "users_per_s" if method == "uls" else "examples_per_s":
            round(statistics.median(w / t for t, w in later), 1),
        "peak_tree_rss_mb": m["peak_tree_rss_mb"], "processes_at_peak": m["processes_at_peak"], "wall_s": m["wall_s"],
        "run_wall_time_s": summary.get("wall_time_s"), "epsilon": summary.get("epsilon"), "delta": summary.get("delta"),
        "q": summary.get("q"), "num_users": summary.get("num_users"), "num_examples": summary.get("num_examples"),
        "eval_loss_before": summary.get("eval_loss_before"), "eval_loss_after": summary.get("eval_loss_after"),
        "console": [f"{t:7.1f}s {line}" for t, line in m["lines"]],
    }


def els_distinct_users(path: Path, k: int, expected_batch: float) -> float:
    """Expected distinct users in an ELS step: sum_u 1 - (1 - q)^kept_u, q = expected batch / kept."""
    import numpy as np

    from fedsim.data.files import FileUserStore

    n = np.minimum(FileUserStore(path, min_examples=1).train_example_counts(), k)
    q = expected_batch / n.sum()
    return float((1 - (1 - q) ** n).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[342_477])
    ap.add_argument("--methods", nargs="+", default=["uls", "els"], choices=["uls", "els"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for both runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "stackoverflow_scale.json")
    args = ap.parse_args(argv)
    from fedsim.config import load_config

    cfg = load_config(CONFIG, args.overrides)
    result: dict = {"config": str(CONFIG.relative_to(ROOT)), "overrides": args.overrides, "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "populations": []}
    with tempfile.TemporaryDirectory(prefix="so-scale-") as tmp:
        for users in args.users:
            pop = {"data": ensure_data(users), "runs": []}
            path = Path(pop["data"]["path"])
            if "els" in args.methods:
                pop["els_distinct_users_per_step"] = round(els_distinct_users(path, cfg.els.k, cfg.els.expected_batch), 1)
            for method in args.methods:
                r = one_run(method, path, Path(tmp), args.overrides)
                print(json.dumps({k: v for k, v in r.items() if k != "console"}), file=sys.stderr)
                pop["runs"].append(r)
            result["populations"].append(pop)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({**result, "populations": [{**p, "runs": [{k: v for k, v in r.items() if k != "console"}
                                                               for r in p["runs"]]} for p in result["populations"]]},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
