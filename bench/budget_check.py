"""Cost of one budget check (`PrivacyBudget.check`: epsilon of the ledger plus one more release)
against the number of releases already recorded.

    python bench/budget_check.py [--reps 7]

Ledgers of 1,000 and 10,000 recorded Poisson-subsampled Gaussian releases (q = 0.01,
sigma = 1, delta = 1e-6), checked under the PLD and RDP accountants; the sizes are
interleaved within each repetition. The budget holds one live accountant, composed once per
run of identical releases, and asks with the current run as one SelfComposedDpEvent: the
target is a check after 10,000 releases costing the same as after 1,000 within 2x. Also
timed: rebuilding the budget from a ledger of that length (what a resume does, once). Prints one JSON
object, also written to bench/out/budget_check.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZES = (1_000, 10_000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "budget_check.json"))
    args = ap.parse_args()

    from dp_accounting import dp_event
    from provenance import provenance, write_result

    from fedsim.privacy.accounting import make_accountant
    from fedsim.privacy.budget import PrivacyBudget

    event = dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.0))
    out = {"bench": "budget_check", **provenance(), "event": "PoissonSampled(0.01, Gaussian(1.0))", "delta": 1e-6,
           "accountants": {}}
    for name in ("pld", "rdp"):
        budgets = {}
        rebuild: dict[int, list[float]] = {n: [] for n in SIZES}
        for n in SIZES:
            t = time.perf_counter()
            budgets[n] = PrivacyBudget(lambda: make_accountant(name), 1e-6, None, [event] * n)
            rebuild[n].append(time.perf_counter() - t)
            budgets[n].check(event)  # warm-up
        times: dict[int, list[float]] = {n: [] for n in SIZES}
        for _ in range(args.reps):
            for n in SIZES:  # interleaved
                t = time.perf_counter()
                budgets[n].check(event)
                times[n].append(time.perf_counter() - t)
        ratios = [b / a for a, b in zip(times[SIZES[0]], times[SIZES[1]])]
        out["accountants"][name] = {
            **{f"check_s_after_{n}": {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}
               for n, ts in times.items()},
            "ratio_10000_over_1000": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            **{f"rebuild_s_from_{n}": ts[0] for n, ts in rebuild.items()},
        }
    write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
