"""Run a command and report the peak RSS of its whole process tree (Ray workers included).

    python bench/peak_rss.py -- fedsim run configs/scale_1e5.yaml

`/usr/bin/time -v` reports the largest *single* process; a Ray run is a tree (driver, GCS,
raylet, actors), so this samples the sum of RSS over the command and all its descendants
every 0.2 s (psutil). Prints one JSON line to stderr at the end; the command's exit code is kept.
Note: Ray daemons re-parented away from the tree (they are not, for a local ray.init) would be missed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil


def tree_rss(root) -> tuple[int, int] | None:
    """(summed RSS in bytes, process count) of `root` (a psutil.Process) and all its descendants;
    None once `root` is gone. A child that exits while being read counts as 0."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total, len(procs)


def watch_peak(proc: subprocess.Popen, poll: float = 0.2) -> tuple[int, int]:
    """(largest summed RSS in bytes, processes at that moment) of `proc`'s tree, sampled every
    `poll` seconds until it exits."""
    root = psutil.Process(proc.pid)
    peak, peak_procs = 0, 0
    while proc.poll() is None:
        sample = tree_rss(root)
        if sample is None:
            break
        if sample[0] > peak:
            peak, peak_procs = sample
        time.sleep(poll)
    return peak, peak_procs


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak, peak_procs = watch_peak(proc)
    rc = proc.wait()
    print(json.dumps({"peak_tree_rss_mb": round(peak / 2**20, 1), "processes_at_peak": peak_procs,
                      "wall_s": round(time.perf_counter() - t0, 1), "exit": rc}), file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
