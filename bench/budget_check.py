"""Cost of one budget check (`PrivacyBudget.check`: epsilon of the ledger plus one more release)
against the number of releases already recorded.

    python bench/budget_check.py [--reps 7]

Ledgers of 1,000 and 10,000 recorded Poisson-subsampled Gaussian releases (q = 0.01,
sigma = 1, delta = 1e-6), checked under the PLD and RDP accountants; the sizes are
interleaved within each repetition. The ledger keeps its releases in run-length form, so
the composed event is one SelfComposedDpEvent whatever the history's length: the target is
a check after 10,000 releases costing the same as after 1,000 within 2x. Prints one JSON
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

    from fedsim.privacy import PrivacyLedger
    from fedsim.privacy.accounting import make_accountant
    from fedsim.privacy.budget import PrivacyBudget

    event = dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.0))
    out = {"bench": "budget_check", **provenance(), "event": "PoissonSampled(0.01, Gaussian(1.0))", "delta": 1e-6,
           "accountants": {}}
    for name in ("pld", "rdp"):
        budgets = {}
        for n in SIZES:
            ledger = PrivacyLedger()
            for step in range(n):
                ledger.record(step, event)
            budgets[n] = PrivacyBudget(ledger, make_accountant(name), 1e-6, None)
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
        }
    write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
