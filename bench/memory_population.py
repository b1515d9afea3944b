"""Peak host memory vs population size: a store + 5 rounds of a ~100-user cohort.

    python bench/memory_population.py                       # 10^3 .. 10^6 synthetic + file store
    python bench/memory_population.py --sizes 1000 100000 --skip-files

Each measurement runs in a fresh subprocess (peak RSS is per process): import, build the
store, draw 5 Poisson cohorts at q = cohort / N and read every sampled user's train and
test examples. Reported: peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and its
growth over the process after imports (`delta_mb`), and timings.

Synthetic store (`SyntheticTokenStore`, defaults of `build_store`: min 4 examples,
power-law counts capped at 1000, 64-byte examples) at N = 10^3, 10^4, 10^5, 10^6.
File store (`FileUserStore`) on a generated StackOverflow-like Parquet file
(bench/make_stackoverflow_like.py, 342,477 users by default): once with an empty cache
(first build: stream, index, sort) and once more (cached open: memory-maps the index).
Note: peak RSS counts the file-backed pages of memory-mapped files that were touched; for
the build, that is the whole unsorted Arrow file (clean page cache the kernel can drop).

Target (docs/architecture.md, README performance): flat in the population, < 2 GB at 10^6 users.
Prints one JSON object, also written to bench/out/memory_population.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rounds(store, cohort: float, rounds: int, seed: int) -> dict:
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.sampling import PoissonSampler

    q = min(1.0, cohort / store.num_users)
    sampler = PoissonSampler(store.num_users, q, SecretRandomness.from_seed(seed), "uls-cohort")
    t0 = time.perf_counter()
    sizes, examples, nbytes = [], 0, 0
    for rnd in range(1, rounds + 1):
        users = sampler.sample(rnd)
        sizes.append(int(users.size))
        for u in users.tolist():
            for ex in (store.train_examples(u), store.test_examples(u)):
                examples += len(ex)
                nbytes += sum(len(x) for x in ex)
    return {"q": q, "cohort_sizes": sizes, "examples_read": examples, "text_chars_read": nbytes,
            "rounds_seconds": round(time.perf_counter() - t0, 3)}


def child(args) -> dict:
    import numpy  # noqa: F401  (imports are the baseline, not the store)
    import pyarrow  # noqa: F401

    import fedsim.sampling  # noqa: F401

    if args.child == "synthetic":
        from fedsim.data.synthetic import SyntheticTokenStore
    else:
        from fedsim.data.files import FileUserStore
    base_peak, base_rss = _peak_mb(), _rss_mb()
    t0 = time.perf_counter()
    if args.child == "synthetic":
        store = SyntheticTokenStore(args.users, 0, seq_len=64, min_examples=4, max_examples=1000)
        extra = {}
    else:
        store = FileUserStore(args.file, min_examples=1)
        extra = {"built": store.built, "build_seconds": store.stats["build_seconds"] if store.built else None,
                 "rows": store.stats["rows_read"], "examples": store.stats["examples"]}
    open_s = time.perf_counter() - t0
    after_store = _peak_mb()
    res = {"store": args.child, "users": store.num_users, "store_seconds": round(open_s, 3), **extra,
           "store_peak_delta_mb": round(after_store - base_peak, 1)}
    res.update(_rounds(store, args.cohort, args.rounds, args.seed))
    peak = _peak_mb()
    res.update({"baseline_rss_mb": round(base_rss, 1), "peak_rss_mb": round(peak, 1),
                "delta_mb": round(peak - base_peak, 1)})
    return res


def run_child(argv: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6])
    ap.add_argument("--cohort", type=float, default=100.0, help="expected users per round (q = cohort / N)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--file", type=Path, default=None, help="a (user_id, text) file; default: generate one")
    ap.add_argument("--file-users", type=int, default=342_477)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "memory_population.json")
    ap.add_argument("--child", choices=["synthetic", "files"], help=argparse.SUPPRESS)
    ap.add_argument("--users", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return 0

    common = ["--cohort", str(args.cohort), "--rounds", str(args.rounds), "--seed", str(args.seed)]
    result: dict = {"cohort": args.cohort, "rounds": args.rounds, "synthetic": []}
    for n in args.sizes:
        r = run_child(["--child", "synthetic", "--users", str(n), *common])
        result["synthetic"].append(r)
        print(f"synthetic N={n}: peak {r['peak_rss_mb']} MB (+{r['delta_mb']} MB over imports)", file=sys.stderr)
    if not args.skip_files:
        path = args.file
        if path is None:
            from bench.make_stackoverflow_like import default_out

            path = default_out().with_name(f"stackoverflow_like_{args.file_users}.parquet")
            if not path.is_file():
                gen = subprocess.run([sys.executable, str(ROOT / "bench" / "make_stackoverflow_like.py"),
                                      "--users", str(args.file_users), "--out", str(path)],
                                     capture_output=True, text=True, check=True)
                result["generated"] = json.loads(gen.stdout)
        with tempfile.TemporaryDirectory(prefix="fedsim-bench-cache-") as cache:
            env = {**os.environ, "FEDSIM_CACHE_DIR": cache}
            argv_f = ["--child", "files", "--file", str(path), *common]
            result["files"] = {"path": str(path), "bytes": path.stat().st_size,
                               "first_build": run_child(argv_f, env), "cached_open": run_child(argv_f, env)}
        print(f"files: build {result['files']['first_build']['store_seconds']} s, "
              f"open {result['files']['cached_open']['store_seconds']} s", file=sys.stderr)
    peaks = [r["peak_rss_mb"] for r in result["synthetic"]]
    result["synthetic_peak_spread_mb"] = round(max(peaks) - min(peaks), 1) if peaks else None
    result["target"] = "flat in population; < 2048 MB at 10^6 users"
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
