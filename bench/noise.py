"""Secure noise (AES-256-CTR keystream, float64 Box-Muller, snapped) against the torch.randn it
replaced, and against the rounds it is added to.

    python bench/noise.py                        # all three sizes, the default round, the 124M round
    python bench/noise.py --reps 5 --skip-gpt2   # faster: no GPT-2-small round

Per d (4,608: the default's LoRA adapters; 1,179,648: configs/gpu.yaml's LoRA adapters;
123,751,680: every weight of the GPT-2-small shape, i.e. full fine-tuning) it times, interleaved
and repeated, (a) `GaussianMechanism.add_noise` on a float32 aggregate with a fresh secure
keystream (what a ULS round or an ELS step runs) and (b) `torch.randn(d) * std` added in place
(the old float32 path), and reports medians, ranges and the ratio (a) / (b).

Rounds, measured in the same process:
  * the Shakespeare default: `fedsim run configs/default.yaml` for a few rounds (Ray, one
    Flower node per user), per-round wall time from diagnostics.jsonl (noise included);
  * bench/gpt2_small_lora.py's workload: a cohort of GPT-2-small-shape LoRA users trained by a
    `CohortWorker` (the ClientApp's work), interleaved with the noise timings.
The secure noise's share of a round is its median time over the round's median time, for the
default (d = 4,608) and for the 124M workload with the full 123.75M-coordinate noise (the
worst case: full fine-tuning noise added to a LoRA round's compute).
Prints one JSON object, also written to bench/out/noise.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZES = {"default_lora": 4_608, "gpu_lora": 1_179_648, "gpt2_small_full": 123_751_680}


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def time_noise(d: int, reps: int) -> dict:
    import torch

    from fedsim.privacy.mechanisms import GaussianMechanism
    from fedsim.privacy.randomness import SecretRandomness

    mech = GaussianMechanism(1.0, 1.0)
    agg = torch.zeros(d)
    key = SecretRandomness.secure()
    secure, plain = [], []
    for rep in range(reps + 1):  # rep 0 warms up both paths
        t = time.perf_counter()
        mech.add_noise(agg, key.stream("bench-noise", rep))
        ts = time.perf_counter() - t
        t = time.perf_counter()
        agg.add_(torch.randn(d).mul_(mech.noise_std()))
        tp = time.perf_counter() - t
        if rep:
            secure.append(ts)
            plain.append(tp)
    ratios = [s / p for s, p in zip(secure, plain)]
    return {"d": d, "secure_s": _spread(secure), "torch_randn_s": _spread(plain), "ratio_secure_over_randn": _spread(ratios)}


def default_round_seconds(rounds: int) -> dict:
    from fedsim.config import load_config
    from fedsim.rundir import read_diagnostics
    from fedsim.loop import run_uls

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "default.yaml",
                          [f"run.output_dir={tmp}", f"run.rounds={rounds}", f"run.eval_every={rounds + 1}"])
        run_dir, summary = run_uls(cfg, say=lambda *_: None)
        times = [r["time"] for r in read_diagnostics(run_dir) if r.get("round", 0) >= 2]  # round 1: warm-up
    return {"round_s": _spread(times), "trainable_weights": summary["trainable_weights"]}


def gpt2_rounds(reps: int, cohort: int, threads: int) -> dict:
    """Interleaved: a 124M LoRA round, then the full-size secure noise and torch.randn."""
    import numpy as np
    import torch

    from gpt2_small_lora import build_worker

    from fedsim.privacy.mechanisms import GaussianMechanism
    from fedsim.privacy.randomness import SecretRandomness

    _, store, task, worker = build_worker(threads)
    d_full = sum(p.numel() for p in task.model.parameters())
    mech, key = GaussianMechanism(1.0, 1.0), SecretRandomness.secure()
    agg = torch.zeros(d_full)
    rng = np.random.default_rng(0)
    w = task.flat.get().detach().clone()
    rounds, secure, plain = [], [], []
    for rep in range(reps + 1):  # rep 0 warms up
        users = rng.choice(store.num_users, size=cohort, replace=False).tolist()
        t = time.perf_counter()
        worker.train_users(users, w, rep + 1)
        tr = time.perf_counter() - t
        t = time.perf_counter()
        mech.add_noise(agg, key.stream("bench-noise", rep))
        ts = time.perf_counter() - t
        t = time.perf_counter()
        agg.add_(torch.randn(d_full))
        tp = time.perf_counter() - t
        print(f"gpt2 rep {rep}: round {tr:.1f}s, secure noise {ts:.2f}s, randn {tp:.2f}s", file=sys.stderr)
        if rep:
            rounds.append(tr)
            secure.append(ts)
            plain.append(tp)
    return {"parameters": d_full, "trainable_weights": task.flat.numel, "cohort": cohort, "threads": threads,
            "round_s": _spread(rounds), "secure_full_noise_s": _spread(secure), "torch_randn_full_s": _spread(plain),
            "share_of_round": _spread([s / (r + s) for s, r in zip(secure, rounds)])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--default-rounds", type=int, default=6)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--gpt2-reps", type=int, default=3)
    ap.add_argument("--gpt2-cohort", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "noise.json"))
    args = ap.parse_args()

    import torch

    from provenance import provenance, write_result

    torch.set_num_threads(args.threads)
    out = {"bench": "noise", **provenance(), "torch_threads": args.threads,
           "secure": "AES-256-CTR keystream, float64 Box-Muller (radius uniform refined near 0), snapped to 2^-16 std",
           "baseline": "torch.randn (float32, MT19937, Box-Muller on 24-bit uniforms)", "sizes": {}}
    for name, d in SIZES.items():
        reps = args.reps if d < 10**8 else max(3, args.reps // 2)
        out["sizes"][name] = time_noise(d, reps)
        print(f"{name}: {json.dumps(out['sizes'][name])}", file=sys.stderr)
    default = default_round_seconds(args.default_rounds)
    noise_default = out["sizes"]["default_lora"]["secure_s"]["median"]
    default["secure_noise_share_of_round"] = noise_default / default["round_s"]["median"]
    out["default_round"] = default
    if not args.skip_gpt2:
        out["gpt2_small_round"] = gpt2_rounds(args.gpt2_reps, args.gpt2_cohort, args.threads)
    write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
