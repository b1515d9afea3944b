"""Multi-core scaling of ULS cohort workers: users/s with 1, 2 and 4 Ray workers (and one
worker with 2 threads), on the GPT-2-small-size LoRA config or the shared workload.

    python bench/worker_scaling.py --workload gpt2_small_lora      # configs/gpu.yaml on the CPU
    python bench/worker_scaling.py --workload shared --reps 3
    python bench/worker_scaling.py --variants w1t1 w2t1 --rounds 3

Each variant is one `fedsim run` in a fresh subprocess (the real path: Flower's simulation
engine, a local Ray, cohort workers as Ray actors), interleaved and rotated per repetition:

  w1t1   1 worker, 1 torch thread      (the baseline)
  w1t2   1 worker, 2 torch threads     (intra-op parallelism instead of more workers)
  w2t1   2 workers, 1 thread each      (one per core)
  w4t1   4 workers, 1 thread each      (twice the cores: where it stops scaling)

The cohort is split evenly over the workers (`uls.users_per_client` = ceil(expected cohort /
workers)). Workloads:

  gpt2_small_lora  configs/gpu.yaml's model (12 layers, width 768, GPT-2's 50,257 vocabulary,
                   context 128, LoRA r 8 on c_attn/c_proj/c_fc: 1.18M trainable weights), on
                   the CPU in float32; 100,000 synthetic users; expected cohort 8 (default),
                   8 examples and one local step of batch 8 per user; evaluation on 8 examples
  shared           bench/shared_workload.py's workload (GPT-2 2x128, full training, 2,000 users,
                   cohort ~100)

Reported per variant: median seconds per round and users/s over rounds 2.. (round 1 warms up),
their range over repetitions, peak RSS of the process tree, and users/s relative to w1t1.
Prints JSON, also written to bench/out/worker_scaling_<workload>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from peak_rss import watch_peak  # noqa: E402 - one process-tree peak sampler for the bench scripts
from shared_workload import workload_overrides  # noqa: E402 - the one definition of the shared workload

VARIANTS = {"w1t1": (1, 1), "w1t2": (1, 2), "w2t1": (2, 1), "w4t1": (4, 1)}  # (workers, threads per worker)


def overrides(workload: str, out_dir: str, rounds: int, cohort: float, workers: int, threads: int) -> tuple[str | None, list[str]]:
    per_worker = int(math.ceil(cohort / workers))
    common = [f"run.output_dir={out_dir}", f"run.rounds={rounds}", f"run.threads={threads}",
              f"simulation.num_workers={workers}", f"uls.users_per_client={max(2, per_worker)}",
              "simulation.backend=ray", "simulation.num_cpus=1"]
    if workload == "shared":
        return None, [*workload_overrides(out_dir), *common]
    return "configs/gpu.yaml", [
        *common, "run.device=cpu", "model.dtype=float32", "simulation.num_gpus=0", "run.eval_every=1000",
        "run.eval_examples=8", "run.seed=0", f"uls.expected_cohort={cohort}", "uls.max_examples_per_user=8",
        "uls.batch_size=8", "uls.server_optimizer=sgd", "uls.server_lr=1.0", "dp.epsilon=null",
        "dp.noise_multiplier=1.0", "dp.reproducible=true"]


def run_one(workload: str, variant: str, rounds: int, cohort: float) -> dict:
    workers, threads = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        config, sets = overrides(workload, tmp, rounds, cohort, workers, threads)
        cmd = [sys.executable, "-m", "fedsim.cli", "run", *([config] if config else []),
               *[a for s in [*sets, f"run.name={variant}"] for a in ("--set", s)]]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, _ = watch_peak(proc)
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise RuntimeError(f"{variant} failed:\n{err[-3000:]}")
        wall = time.perf_counter() - t0
        run_dir = next(Path(tmp).iterdir())
        from fedsim.rundir import read_diagnostics

        rows = [r for r in read_diagnostics(run_dir) if r.get("round", 0) >= 2]
    times, users = [r["time"] for r in rows], [r["users"] for r in rows]
    return {"round_times": times, "users": users, "s_per_round": statistics.median(times),
            "users_per_s": sum(users) / sum(times), "peak_rss_mb": peak / 2**20, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["gpt2_small_lora", "shared"], default="gpt2_small_lora")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run; round 1 is not counted")
    ap.add_argument("--cohort", type=float, default=None, help="expected cohort (default: 8, or 100 for shared)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cohort = args.cohort or (100.0 if args.workload == "shared" else 8.0)
    env_note = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rep in range(args.reps):
        order = args.variants[rep % len(args.variants):] + args.variants[: rep % len(args.variants)]
        for v in order:
            res = run_one(args.workload, v, args.rounds, cohort)
            runs[v].append(res)
            print(f"rep {rep + 1} {v}: {res['s_per_round']:.2f} s/round, {res['users_per_s']:.3f} users/s,"
                  f" peak {res['peak_rss_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    summary = {}
    for v, rs in runs.items():
        ups = [r["users_per_s"] for r in rs]
        summary[v] = {"workers": VARIANTS[v][0], "threads_per_worker": VARIANTS[v][1],
                      "users_per_s_median": statistics.median(ups), "users_per_s_min": min(ups),
                      "users_per_s_max": max(ups),
                      "s_per_round_median": statistics.median(r["s_per_round"] for r in rs),
                      "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs), "reps": len(rs)}
    if "w1t1" in summary:
        for s in summary.values():
            s["users_per_s_vs_w1t1"] = s["users_per_s_median"] / summary["w1t1"]["users_per_s_median"]
    import torch

    result = {"workload": args.workload, "expected_cohort": cohort, "rounds": args.rounds,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "load_avg_end": os.getloadavg(), **env_note},
              "date": time.strftime("%Y-%m-%d"), "summary": summary, "runs": runs}
    out = Path(args.out or ROOT / "bench" / "out" / f"worker_scaling_{args.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
