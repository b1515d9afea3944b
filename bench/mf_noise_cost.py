"""Per-round cost of banded matrix-factorization noise against independent Gaussian noise.

    python bench/mf_noise_cost.py                 # d = 4,608 and 1,180,000; b = 1, 2, 4, 8, 16
    python bench/mf_noise_cost.py --reps 21

Per d (4,608: the Shakespeare default's LoRA adapters; 1,180,000: about configs/gpu.yaml's LoRA
adapters) it times one round's noise, interleaved and repeated: the Gaussian mechanism's
`add_noise` (what DP-FedAvg runs) and `BandedNoise.add` (fedsim/privacy/banded_mf.py) for each
number of bands b, every process in steady state (more than b rounds in, so the recurrence uses
all b - 1 stored vectors). Both draw from a secure keystream (AES-256-CTR, float64 Box-Muller)
and snap to the same grid, on one float32 aggregate, with the run's default of one torch thread.
Reports median, min and max seconds, the median of the per-repetition ratios MF / Gaussian,
and the extra memory of the state, (b - 1) d 8 bytes (float64), as measured on the process.
Prints one JSON object, also written to bench/out/mf_noise_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZES = {"default_lora": 4_608, "gpu_lora": 1_180_000}
BANDS = (1, 2, 4, 8, 16)


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def time_size(d: int, reps: int, rounds: int) -> dict:
    import torch

    from fedsim.privacy.mechanisms import BandedMFMechanism, GaussianMechanism
    from fedsim.privacy.randomness import SecretRandomness

    key = SecretRandomness.secure()
    agg = torch.zeros(d)
    arms = {"gaussian": GaussianMechanism(1.0, 1.0).noise_process(key, "bench-gauss")}
    for b in BANDS:
        mech = BandedMFMechanism.configured(bands=b, strategy="sqrt", rounds=rounds)(1.0, 1.0)
        arms[f"mf_b{b}"] = mech.noise_process(key, f"bench-mf{b}")
    step = 0
    for step in range(1, max(BANDS) + 2):  # warm-up: every process in steady state
        for proc in arms.values():
            proc.add(agg, step)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(reps):  # interleaved: every arm once per repetition
        step += 1
        for name, proc in arms.items():
            t = time.perf_counter()
            proc.add(agg, step)
            times[name].append(time.perf_counter() - t)
    out = {"d": d, "gaussian_s": _spread(times["gaussian"]), "banded_mf": {}}
    for b in BANDS:
        name = f"mf_b{b}"
        ratios = [m / g for m, g in zip(times[name], times["gaussian"])]
        out["banded_mf"][str(b)] = {
            "seconds": _spread(times[name]), "ratio_over_gaussian": _spread(ratios),
            "extra_memory_bytes": (b - 1) * d * 8, "measured_state_bytes": getattr(arms[name], "memory_bytes", 0)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (runs use 1 unless run.threads)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "mf_noise_cost.json"))
    args = ap.parse_args()

    import torch
    from provenance import provenance, write_result

    torch.set_num_threads(args.threads)
    out = {"bench": "mf_noise_cost", **provenance(), "torch_threads": args.threads, "reps": args.reps,
           "strategy": "banded sqrt (the optimised strategy has the same recurrence cost)",
           "noise": "secure keystream, float64 Box-Muller, snapped to 2^-16 std; MF: w_t = (z_t - sum c_j w_{t-j}) / c_0",
           "sizes": {}}
    for name, d in SIZES.items():
        out["sizes"][name] = time_size(d, args.reps, rounds=1000)
        print(f"{name}: {json.dumps(out['sizes'][name])}", file=sys.stderr)
    write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
