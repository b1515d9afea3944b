"""Checkpoint overhead per round (ULS) and per step (ELS), as a ratio, measured in one run.

For each trainer, runs with ``run.checkpoint_every=1`` and with checkpoints off are
interleaved (off, on, off, on, ...) and repeated. Two figures per trainer:

* ``ratio_loop_median`` (``_min``, ``_max``: the spread over the repetitions): per interleaved
  pair, the training loop's wall time (sum of the round/step times in diagnostics.jsonl plus the
  checkpoint writes; model build and the first evaluation excluded) with checkpoints on / off;
* ``ratio_direct``: (median round time + median ``save_checkpoint`` time) / median round
  time, timing every ``save_checkpoint`` call of the "on" runs (less noisy on a shared
  machine).

ULS runs on the in-process backend (no Ray start-up noise) with the default config's model
(GPT-2 byte model, LoRA); ELS with the default ELS settings. Prints JSON and writes
bench/out/checkpoint_overhead.json. Usage: ``python bench/checkpoint_overhead.py [--reps 3]``.
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


def _timed_save(records: list):
    import fedsim.checkpoint as ck

    original = ck.save_checkpoint

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        records.append(time.perf_counter() - t0)
        return out

    return original, wrapper


def one_run(method: str, every: int, out: Path, rounds: int) -> dict:
    import fedsim.checkpoint as ck
    from fedsim.config import load_config
    from fedsim.loop import run_els
    from fedsim.loop import run_uls

    saves: list[float] = []
    original, wrapper = _timed_save(saves)
    ck.save_checkpoint = wrapper  # checkpoint_if_due (ULS and ELS) looks it up at call time
    try:
        common = [f"run.output_dir={out}", f"run.checkpoint_every={every}", "run.eval_every=100000",
                  "simulation.backend=inprocess", "dp.epsilon=8"]
        if method == "ULS":
            cfg = load_config(ROOT / "configs/default.yaml", [*common, f"run.rounds={rounds}"])
            run_dir, s = run_uls(cfg, say=lambda *_: None)
            key = "round"
        else:
            cfg = load_config(ROOT / "configs/default.yaml", [*common, f"els.steps={rounds}", "els.eval_every=100000"])
            run_dir, s = run_els(cfg, say=lambda *_: None)
            key = "step"
    finally:
        ck.save_checkpoint = original
    from fedsim.rundir import read_diagnostics

    rows = read_diagnostics(run_dir)  # wall times are simulation diagnostics
    times = [r["time"] for r in rows if r.get(key, 0) > 0 and "time" in r]
    return {"every": every, "wall_s": s["wall_time_s"], "loop_s": sum(times) + sum(saves),
            "median_round_s": statistics.median(times), "saves": len(saves),
            "median_save_s": statistics.median(saves) if saves else 0.0,
            "checkpoint_bytes": sum(p.stat().st_size for p in run_dir.glob("checkpoint-r*.safetensors"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--uls-rounds", type=int, default=8)
    ap.add_argument("--els-steps", type=int, default=40)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from provenance import provenance

    result = {**provenance(), "reps": args.reps, "trainers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method, n in (("ULS", args.uls_rounds), ("ELS", args.els_steps)):
            runs = {0: [], 1: []}
            for rep in range(args.reps):
                for every in (0, 1):  # interleaved
                    runs[every].append(one_run(method, every, Path(tmp) / f"{method}-{rep}-{every}", n))
            off, on = runs[0], runs[1]
            loop_ratio = [b["loop_s"] / a["loop_s"] for a, b in zip(off, on)]
            rnd = statistics.median(r["median_round_s"] for r in off + on)
            save = statistics.median(r["median_save_s"] for r in on)
            result["trainers"][method] = {
                "rounds_or_steps": n, "median_round_s": rnd, "median_save_s": save,
                "checkpoint_bytes": on[0]["checkpoint_bytes"],
                "ratio_direct": (rnd + save) / rnd,
                "ratio_loop_median": statistics.median(loop_ratio),
                "ratio_loop_min": min(loop_ratio), "ratio_loop_max": max(loop_ratio),
                "runs": {"off": off, "on": on},
            }
            print(f"{method}: round {rnd * 1e3:.1f} ms, save {save * 1e3:.2f} ms -> x{(rnd + save) / rnd:.4f};"
                  f" loop ratio median x{statistics.median(loop_ratio):.3f} ({min(loop_ratio):.3f}-{max(loop_ratio):.3f})",
                  file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    dest = ROOT / "bench" / "out"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "checkpoint_overhead.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
