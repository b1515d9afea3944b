"""Accountant benchmark: epsilon and time of PLD, RDP, PRV and Edgeworth on a grid of
Poisson-subsampled Gaussian settings, and the noise each needs for a target epsilon.

    python bench/accountants.py            # full grid (~13 min on 2 shared cores)
    python bench/accountants.py --quick    # small grid (~1 min)

Prints one JSON object (also written to bench/out/accountants.json) and draws
bench/out/accountants_eps_vs_steps.png. All numbers come from this one run.

Grid: q in {1e-3, 1e-2, 0.05, 0.1} x sigma in {0.6, 0.8, 1, 1.5, 2} x T in {10 .. 1e5} x
delta in {1e-5, 1e-8} (200 combinations), minus those whose RDP epsilon exceeds
`--max-eps` (default 16): those are not private in any useful sense and are the slow
ones for PRV (its domain grows with epsilon and T); T=1e5 is kept at delta=1e-5 only
(T=1e5 PRV calls take ~10-20 s each). 131 settings remain.

Accountants (all on the same event):
  pld        dp_accounting PLD, value_discretization_interval 1e-4 (1e-3 is ~30% loose
             when the per-step privacy loss is itself ~1e-3, e.g. q=1e-3, sigma=2, T=1e5)
  rdp        dp_accounting RDP
  prv        prv_accountant (Gopi et al. 2021), upper bound (estimate also recorded),
             both add and remove directions
  edgeworth  fedsim's Edgeworth accountant as reported: max(finite-sample bound, PLD),
             or PLD when the bound is vacuous (its raw bound is recorded as edgeworth_bound)
  edgeworth_approx  the Edgeworth estimate (EW-Tune's number): NOT a bound
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

FULL = {"q": [1e-3, 1e-2, 0.05, 0.1], "sigma": [0.6, 0.8, 1.0, 1.5, 2.0],
        "steps": [10, 100, 1000, 10**4, 10**5], "delta": [1e-5, 1e-8]}
QUICK = {"q": [1e-2, 0.1], "sigma": [1.0, 2.0], "steps": [100, 1000], "delta": [1e-5]}
# Calibration targets: epsilon in {1, 3, 8} at delta 1e-5 for a handful of (q, T).
TARGETS_FULL = {"epsilon": [1.0, 3.0, 8.0], "delta": 1e-5, "q_steps": [(1e-3, 10**4), (1e-2, 1000), (0.05, 1000)]}
TARGETS_QUICK = {"epsilon": [3.0], "delta": 1e-5, "q_steps": [(1e-2, 1000)]}
PLOT = {"q": 1e-2, "sigma": 1.0, "delta": 1e-5}
PLD_VDI = 1e-4


def _accountants():
    from fedsim.privacy.accounting import pld_accountant, rdp_accountant
    from fedsim.privacy.edgeworth import EdgeworthAccountant
    from fedsim.privacy.prv import PrvAccountant

    # fresh-accountant factories (accountants are stateful). max_domain_points 1e6 (default
    # 3e6): the library FFTs in long double, 3e6 points take ~20 s per call at T=1e5; above
    # the cap eps_error is widened (recorded per setting).
    return {"pld": lambda: pld_accountant(PLD_VDI), "rdp": rdp_accountant,
            "prv": lambda: PrvAccountant(max_domain_points=1_000_000),
            "edgeworth": lambda: EdgeworthAccountant(value_discretization_interval=PLD_VDI)}


def _eps(make, event, delta):
    from fedsim.privacy.accounting import epsilon

    return epsilon(make(), event, delta)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _num(x):
    return x if x is not None and math.isfinite(x) else None


def one_setting(acc, q, sigma, steps, delta) -> dict:
    """Epsilon and seconds per accountant for one setting."""
    from fedsim.privacy.accounting import poisson_gaussian_event

    ev = poisson_gaussian_event(q, sigma, steps)
    pld, t_pld = _timed(lambda: _eps(acc["pld"], ev, delta))
    rdp, t_rdp = _timed(lambda: _eps(acc["rdp"], ev, delta))
    prv, t_prv = _timed(lambda: acc["prv"]().compose(ev).epsilon_bounds(delta))
    edgeworth, t_edgeworth = _timed(lambda: acc["edgeworth"]().compose(ev))  # its PLD is composed alongside
    bound, t_bound = _timed(lambda: edgeworth.epsilon_bound(delta))
    approx, t_approx = _timed(lambda: edgeworth.epsilon_approximation(delta))
    # The registered accountant's rule (EdgeworthAccountant.epsilon_report), reusing this PLD value.
    reported = max(bound, pld) if math.isfinite(bound) else pld
    return {
        "q": q, "sigma": sigma, "steps": steps, "delta": delta,
        "eps": {"pld": pld, "rdp": rdp, "prv": prv.upper, "prv_estimate": prv.estimate, "prv_lower": prv.lower,
                "edgeworth": reported, "edgeworth_bound": _num(bound), "edgeworth_approx": approx},
        "prv_eps_error": prv.eps_error,
        "edgeworth_source": "edgeworth-bound" if math.isfinite(bound) else "pld-fallback",
        # the reported Edgeworth value needs the bound and the PLD value
        "seconds": {"pld": t_pld, "rdp": t_rdp, "prv": t_prv, "edgeworth": t_edgeworth + t_bound,
                    "edgeworth_approx": t_approx},
    }


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(rows: list[dict]) -> dict:
    rel = lambda a, b: (a - b) / b if b > 0 else None  # noqa: E731
    e = [r["eps"] for r in rows]
    return {
        "settings": len(rows),
        "rdp_minus_pld": _stats([x["rdp"] - x["pld"] for x in e]),
        "rdp_vs_pld_relative": _stats([rel(x["rdp"], x["pld"]) for x in e]),
        "prv_upper_vs_pld_relative": _stats([rel(x["prv"], x["pld"]) for x in e]),
        "prv_estimate_vs_pld_relative": _stats([rel(x["prv_estimate"], x["pld"]) for x in e]),
        "prv_upper_below_pld": sum(x["prv"] < x["pld"] for x in e),
        "edgeworth_bound_finite": sum(x["edgeworth_bound"] is not None for x in e),
        "edgeworth_bound_vs_pld_relative": _stats([rel(x["edgeworth_bound"], x["pld"]) for x in e
                                                   if x["edgeworth_bound"] is not None]),
        "edgeworth_reported_below_pld": sum(x["edgeworth"] < x["pld"] for x in e),
        "edgeworth_approx_vs_pld_relative": _stats([rel(x["edgeworth_approx"], x["pld"]) for x in e]),
        "edgeworth_approx_abs_vs_pld_relative": _stats([abs(rel(x["edgeworth_approx"], x["pld"]) or 0) for x in e]),
        "edgeworth_approx_below_pld": sum(x["edgeworth_approx"] < x["pld"] for x in e),
        "edgeworth_approx_vs_pld_relative_by_steps": {
            str(t): _stats([rel(r["eps"]["edgeworth_approx"], r["eps"]["pld"]) for r in rows if r["steps"] == t])
            for t in sorted({r["steps"] for r in rows})},
        "seconds": {name: _stats([r["seconds"][name] for r in rows]) for name in rows[0]["seconds"]} if rows else {},
    }


def _calibrate_in(make, eps: float, delta: float, acc, lo: float, hi: float) -> float:
    """`calibrate_noise`'s answer (upper end of a bracket narrowed to rtol 1e-3) searched in
    [lo, hi] when that brackets the target (checked), else the general search from hi.

    Seeding from a related accountant's sigma saves ~3 of ~12 accountant calls per target,
    which matters for PRV and fine-grid PLD at T=1e4 (~5 s per call).
    """
    from fedsim.privacy.calibration import calibrate_noise, log_bisect

    def e(s):
        return _eps(acc, make(s), delta)

    if not (e(hi) <= eps < e(lo)):
        return calibrate_noise(make, eps, delta, acc, guess=hi)
    return log_bisect(lambda s: e(s) <= eps, hi, lo, 1e-3)  # invariant: e(hi) <= eps < e(lo)


def calibrations(acc, targets: dict) -> dict:
    """Noise multiplier per accountant for each (q, T, epsilon) and the reduction vs RDP."""
    from fedsim.privacy.accounting import poisson_gaussian_event
    from fedsim.privacy.calibration import calibrate_noise
    from fedsim.privacy.edgeworth import EdgeworthApproximation

    delta = targets["delta"]
    approx = EdgeworthApproximation()
    out = []
    for (q, steps), eps in itertools.product(targets["q_steps"], targets["epsilon"]):
        make = lambda s, q=q, steps=steps: poisson_gaussian_event(q, s, steps)  # noqa: E731
        sig, secs = {}, {}
        sig["rdp"], secs["rdp"] = _timed(lambda: calibrate_noise(make, eps, delta, acc["rdp"]))
        # RDP is looser than PLD (sigma_PLD <= sigma_RDP, ~5-20% less here); PRV's upper
        # bound is within a few % above PLD; the approximation within ~15% either way.
        r = sig["rdp"]
        sig["pld"], secs["pld"] = _timed(lambda: _calibrate_in(make, eps, delta, acc["pld"], 0.75 * r, r))
        p = sig["pld"]
        sig["prv"], secs["prv"] = _timed(lambda: _calibrate_in(make, eps, delta, acc["prv"], 0.99 * p, 1.05 * p))
        sig["edgeworth_approx"], secs["edgeworth_approx"] = _timed(
            lambda: _calibrate_in(make, eps, delta, approx, p / 1.15, 1.15 * p))
        # The reported Edgeworth epsilon is max(bound, PLD), or PLD when the bound is vacuous.
        # If the bound is vacuous at sigma_PLD, the reported value equals PLD there (<= target)
        # and exceeds the target for any smaller sigma (PLD does), so sigma_EW = sigma_PLD
        # exactly; only a finite bound needs its own search.
        (bound, secs["edgeworth"]) = _timed(lambda: acc["edgeworth"]().compose(make(sig["pld"])).epsilon_bound(delta))
        if math.isfinite(bound):
            sig["edgeworth"], t = _timed(lambda: calibrate_noise(make, eps, delta, acc["edgeworth"], guess=sig["pld"]))
            secs["edgeworth"] += t
            source = "edgeworth-bound"
        else:
            sig["edgeworth"], source = sig["pld"], "pld-fallback"
        red = {k: 100.0 * (sig["rdp"] - v) / sig["rdp"] for k, v in sig.items() if k != "rdp"}
        out.append({"q": q, "steps": steps, "epsilon": eps, "delta": delta, "sigma": sig, "edgeworth_source": source,
                    "sigma_reduction_vs_rdp_percent": red, "seconds": secs})
        print(f"  calibrated q={q:g} T={steps} eps={eps:g}: " + ", ".join(f"{k}={v:.4f}" for k, v in sig.items()),
              file=sys.stderr)
    summary = {k: _stats([c["sigma_reduction_vs_rdp_percent"][k] for c in out])
               for k in ("pld", "prv", "edgeworth", "edgeworth_approx")}
    return {"targets": out, "sigma_reduction_vs_rdp_percent": summary}


def eps_vs_steps(acc, quick: bool) -> dict:

    steps = [10, 100, 1000, 10**4] if quick else [10, 30, 100, 300, 1000, 3000, 10**4, 3 * 10**4, 10**5]
    curves = {k: [] for k in ("pld", "rdp", "prv", "edgeworth", "edgeworth_approx")}
    for t in steps:
        r = one_setting(acc, PLOT["q"], PLOT["sigma"], t, PLOT["delta"])
        for k in curves:
            curves[k].append(r["eps"][k])
    return {**PLOT, "steps": steps, "eps": curves}


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"rdp": ("RDP (bound)", "-", "o"), "pld": ("PLD (bound)", "-", "s"), "prv": ("PRV upper (bound)", "--", "^"),
              "edgeworth": ("Edgeworth as reported (bound; PLD fallback)", ":", "x"),
              "edgeworth_approx": ("Edgeworth approximation (NOT a bound)", "-.", "d")}
    for k, (label, ls, m) in styles.items():
        ax.plot(curve["steps"], curve["eps"][k], ls, marker=m, label=label, alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps T")
    ax.set_ylabel("epsilon")
    ax.set_title(f"epsilon vs T: Poisson-subsampled Gaussian, q={curve['q']:g}, sigma={curve['sigma']:g}, "
                 f"delta={curve['delta']:g}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid, one calibration target")
    p.add_argument("--max-eps", type=float, default=16.0, help="drop settings whose RDP epsilon exceeds this")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="output directory")
    args = p.parse_args(argv)

    from fedsim.privacy.accounting import poisson_gaussian_event

    acc = _accountants()
    for a in acc.values():  # first-call imports out of the timings
        _eps(a, poisson_gaussian_event(0.5, 1.0, 2), 1e-5)
    grid = QUICK if args.quick else FULL
    started = time.perf_counter()
    settings, dropped = [], 0
    for q, sigma, steps, delta in itertools.product(grid["q"], grid["sigma"], grid["steps"], grid["delta"]):
        if steps >= 10**5 and delta < 1e-5 and not args.quick:  # the slowest PRV calls; 1e-5 kept
            dropped += 1
            continue
        if _eps(acc["rdp"], poisson_gaussian_event(q, sigma, steps), delta) > args.max_eps:
            dropped += 1
            continue
        settings.append((q, sigma, steps, delta))
    rows = []
    for i, s in enumerate(settings, 1):
        rows.append(one_setting(acc, *s))
        print(f"  [{i}/{len(settings)}] q={s[0]:g} sigma={s[1]:g} T={s[2]} delta={s[3]:g}: "
              + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1]["eps"].items() if v is not None), file=sys.stderr)
    grid_seconds = time.perf_counter() - started
    calib = calibrations(acc, TARGETS_QUICK if args.quick else TARGETS_FULL)
    curve = eps_vs_steps(acc, args.quick)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "accountants_eps_vs_steps.png"
    plot(curve, png)
    result = {
        "bench": "accountants", "quick": args.quick, "pld_value_discretization_interval": PLD_VDI,
        "grid": grid, "max_rdp_eps": args.max_eps, "dropped_settings": dropped,
        "summary": summarize(rows), "calibration": calib, "eps_vs_steps": curve,
        "grid_seconds": grid_seconds, "total_seconds": time.perf_counter() - started,
        "plot": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png),
        "settings": rows,
    }
    text = json.dumps(result, indent=1, default=lambda o: None)
    (out_dir / "accountants.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
