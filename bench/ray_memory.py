"""Where the Ray backend's memory goes: the per-process RSS breakdown of a fedsim ULS run on the
shared workload (`bench/shared_workload.py`: GPT-2 2x128 from config, 2,000 synthetic users,
cohort ~100, one local step), cohort workers, 1 and 2 workers.

    python bench/ray_memory.py [--workers 1 2] [--rounds 5]

Each run is `fedsim run` in a fresh subprocess; every 0.2 s the process tree is read and each
process's RSS and PSS (shared pages, e.g. torch's libraries mapped by every process, divided
among the processes that map them: the tree's physical memory) are filed under a label from its command line (driver, gcs_server, raylet,
dashboard, dashboard agent, runtime-env agent (both `ray::` processes the raylet starts), log monitor, autoscaler monitor, cohort worker
actor, idle Ray worker). Reported: at the sample with the largest total, each label's RSS and
process count, and the total. Prints JSON, also written to bench/out/ray_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from shared_workload import workload_overrides  # noqa: E402 - the one definition of the workload

LABELS = [  # (substring of the command line, label): the first that matches
    ("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/agent.py", "dashboard agent"),
    ("dashboard.py", "dashboard"), ("runtime_env/agent", "runtime-env agent"), ("log_monitor.py", "log monitor"),
    ("autoscaler/_private/monitor.py", "autoscaler monitor"), ("ClientAppActor", "cohort worker actor"),
    ("ray::DashboardAgent", "dashboard agent"), ("ray::RuntimeEnvAgent", "runtime-env agent"),
    ("ray::", "Ray worker (other)"), ("default_worker.py", "idle Ray worker"), ("fedsim", "driver (fedsim run)"),
]


def label(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    return next((name for key, name in LABELS if key in cmd), "other: " + cmd[:40])


def breakdown(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    best, best_total = {}, 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for p in procs:
            try:
                mem = p.memory_full_info()  # rss, and pss: shared pages divided among their users
            except psutil.Error:
                continue
            entry = by[label(p)]
            entry[0] += mem.rss / 2**20
            entry[1] += mem.pss / 2**20
            entry[2] += 1
        total = sum(v[0] for v in by.values())
        if total > best_total:
            best_total, best = total, {k: {"rss_mb": round(v[0], 1), "pss_mb": round(v[1], 1), "processes": v[2]}
                                       for k, v in by.items()}
        time.sleep(0.2)
    return {"peak_total_mb": round(best_total, 1),
            "pss_at_peak_mb": round(sum(v["pss_mb"] for v in best.values()), 1),
            "by_process": dict(sorted(best.items(), key=lambda kv: -kv[1]["rss_mb"])),
            "wall_s": round(time.perf_counter() - t0, 1), "exit": proc.wait()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ray_memory.json"))
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            sets = [*workload_overrides(tmp), f"run.rounds={args.rounds}", f"run.name=ray-memory-{w}",
                    f"uls.users_per_client={1000 if w == 1 else 60}", f"simulation.num_workers={w}"]
            cmd = [sys.executable, "-m", "fedsim.cli", "run", *[a for s in sets for a in ("--set", s)]]
            result[f"{w}_worker"] = breakdown(cmd)
            print(json.dumps({f"{w}_worker": result[f"{w}_worker"]}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
