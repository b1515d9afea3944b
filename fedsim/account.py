"""`fedsim account`: epsilon (or the noise for a target epsilon) under every accountant,
and a re-check of a finished run's epsilon from its privacy ledger.

    fedsim account --q 0.001 --sigma 1.1 --steps 1000 --delta 1e-6        # epsilon table
    fedsim account --q 0.001 --steps 1000 --delta 1e-6 --epsilon 2 --find sigma
    fedsim account --q 0.01 --sigma 1 --steps 1000 --delta 1e-6 --k 4      # ELS, k examples/user
    fedsim account RUN_DIR                                                 # exit 0 iff it matches

Rows are labelled "upper bound" or "approximation": only upper bounds may be a run's
epsilon (docs/architecture.md, privacy rules). The Edgeworth row is a bound that falls back to PLD
when the finite-sample Edgeworth bound is vacuous (see `fedsim.privacy.edgeworth`); the
Edgeworth approximation row is EW-Tune's estimate and can be optimistic.

Heavy imports (dp_accounting, prv_accountant, scipy, rich) happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from fedsim.errors import UsageError

# What each row is, for the table and the JSON.
BOUND, APPROX = "upper bound", "approximation (not a bound)"
ALL_ACCOUNTANTS = ("pld", "rdp", "prv", "edgeworth", "edgeworth-approx")
MATCH_RTOL = 1e-6  # RUN_DIR form: relative tolerance between summary.json and the recomputation


def _parser() -> argparse.ArgumentParser:
    from fedsim.cli import ArgumentParser

    p = ArgumentParser(
        prog="fedsim account",
        description="Epsilon of T Poisson-subsampled Gaussian releases under every accountant, "
        "the noise for a target epsilon, or a re-check of a run directory's epsilon.",
    )
    p.add_argument("run_dir", nargs="?", help="a run directory: recompute its epsilon from privacy_ledger.jsonl")
    p.add_argument("--q", type=float, help="sampling rate per step/round, in (0, 1]")
    p.add_argument("--sigma", type=float, help="noise multiplier (noise std / clip norm), > 0")
    p.add_argument("--steps", type=int, help="number of steps/rounds T, >= 1")
    p.add_argument("--delta", type=float, help="target delta, in (0, 1)")
    p.add_argument("--epsilon", type=float, help="target epsilon (with --find sigma)")
    p.add_argument("--find", choices=["sigma"], help="calibrate this parameter for --epsilon per accountant")
    p.add_argument("--k", type=int, help="ELS: examples per user; one step is a mixture of Gaussians over "
                   "Binomial(k, q) (accountants that support it: pld, edgeworth)")
    p.add_argument("--accountants", default=",".join(ALL_ACCOUNTANTS),
                   help=f"comma-separated subset of {','.join(ALL_ACCOUNTANTS)} (default: all)")
    p.add_argument("--vdi", type=float, default=None,
                   help="PLD value discretisation interval (default 1e-4; 1e-3 with --k, where 1e-4 is ~8x slower)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


# --- events and accountants ------------------------------------------------------------------


def _event_factory(q: float, steps: int, k: int | None):
    """sigma -> the DpEvent of `steps` releases (ULS Poisson-Gaussian, or the ELS mixture with k)."""
    from fedsim.privacy.mechanisms import GaussianMechanism

    return lambda sigma: GaussianMechanism(1.0, sigma).run_event(q, steps, k)


def _make(name: str, vdi: float):
    """A fresh accountant; pld and edgeworth share the PLD discretisation, so "never below PLD"
    holds row to row."""
    from fedsim.privacy.accounting import make_accountant

    if name == "edgeworth-approx":
        from fedsim.privacy.edgeworth import EdgeworthApproximation

        return EdgeworthApproximation(vdi)
    return make_accountant(name, **({"value_discretization_interval": vdi} if name in ("pld", "edgeworth") else {}))


def _num(x: float | None):
    """JSON-safe number: non-finite values become null (the row's note says why)."""
    return x if x is not None and math.isfinite(x) else None


def _rows(names, vdi, make_event, fill, **blank) -> list[dict]:
    """One row per accountant: `fill(name, accountant, row)` sets its values, timed (a throw-away
    call on one release first, so first-call imports stay out of the timing)."""
    rows = []
    for name in names:
        acc = _make(name, vdi)
        row = {"accountant": name, "kind": BOUND if getattr(acc, "is_upper_bound", True) else APPROX, **blank,
               "seconds": None, "note": ""}
        rows.append(row)
        if not acc.supports(make_event(1.0)):
            row["note"] = "unsupported event"
            continue
        _make(name, vdi).compose(make_event(1.0).event).get_epsilon(0.5)
        t0 = time.perf_counter()
        fill(name, acc, row)
        row["seconds"] = time.perf_counter() - t0
    return rows


def epsilon_rows(q, sigma, steps, delta, k, names, vdi) -> list[dict]:
    """One row per accountant: epsilon at delta and the seconds it took."""
    make_event = _event_factory(q, steps, k)

    def fill(name, acc, row):
        acc.compose(make_event(sigma))
        if name == "edgeworth":
            rep = acc.epsilon_report(delta)  # the approximation in it costs ~1% of this
            row["epsilon"] = rep.reported
            row["note"] = (f"Edgeworth finite-sample bound {rep.bound:.4g}" if rep.source == "edgeworth-bound"
                           else "Edgeworth bound vacuous at this delta: PLD fallback")
        elif name == "prv":
            b = acc.epsilon_bounds(delta)
            row["epsilon"] = b.upper
            row["note"] = f"estimate {b.estimate:.4f}, lower {b.lower:.4f}, eps_error {b.eps_error:.3g}"
        else:
            row["epsilon"] = float(acc.get_epsilon(delta))

    return _rows(names, vdi, make_event, fill, epsilon=None)


def sigma_rows(q, steps, delta, target, k, names, vdi) -> list[dict]:
    """One row per accountant: the calibrated noise multiplier for (target, delta)."""
    from fedsim.privacy.calibration import calibrate_noise

    make_event = _event_factory(q, steps, k)

    def fill(name, acc, row):
        try:
            row["sigma"] = calibrate_noise(make_event, target, delta, lambda: _make(name, vdi))
        except ValueError as exc:  # no noise up to the search limit meets the target
            row["note"] = str(exc)
        else:
            row["epsilon_at_sigma"] = float(_make(name, vdi).compose(make_event(row["sigma"])).get_epsilon(delta))

    return _rows(names, vdi, make_event, fill, sigma=None, epsilon_at_sigma=None)


def epsilon_by_accountant(ledger, delta: float) -> dict:
    """Epsilon of a ledger under every accountant that supports it (a string for one that fails)."""
    from dp_accounting.privacy_accountant import UnsupportedEventError

    from fedsim.privacy.accounting import accountant_names, epsilon, make_accountant

    if len(ledger) == 0:
        return {}
    event, out = ledger.total_event(), {}
    for name in accountant_names():
        acc = make_accountant(name)
        try:
            if acc.supports(event):
                out[name] = epsilon(acc, event, delta)
        except (UnsupportedEventError, ValueError, FloatingPointError) as exc:
            out[name] = f"unavailable: {type(exc).__name__}"
    return out


# --- RUN_DIR ------------------------------------------------------------------------------------


def run_dirs_of(path: str) -> list[Path]:
    """The run directories under `path`: itself (a ULS or ELS run), or the method runs of a
    `fedsim compare` directory (its subdirectories that hold a ledger)."""
    d = Path(path)
    if d.is_dir() and not (d / "privacy_ledger.jsonl").is_file():
        subs = sorted(p for p in d.iterdir() if (p / "privacy_ledger.jsonl").is_file())
        if subs:
            return subs
    return [d]


def check_run_dir(run_dir: str) -> dict:
    """Recompute a run's epsilon from its ledger with its accountant; compare to summary.json."""
    from fedsim.errors import FedsimError
    from fedsim.privacy.accounting import compute_epsilon
    from fedsim.privacy.ledger import PrivacyLedger

    d = Path(run_dir)
    if not d.is_dir():
        raise FedsimError(f"run directory {run_dir} does not exist")
    ledger_path, summary_path, plan_path = d / "privacy_ledger.jsonl", d / "summary.json", d / "plan.json"
    if not ledger_path.is_file():
        raise FedsimError(f"{ledger_path} is missing")
    finished = summary_path.is_file()
    if not (finished or plan_path.is_file()):
        raise FedsimError(f"{d} has neither summary.json (a finished run) nor plan.json (a run in progress or"
                          " interrupted): no accountant to recompute epsilon with")
    source = summary_path if finished else plan_path
    try:
        summary = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedsimError(f"{source}: not JSON ({exc.msg})") from None
    missing = [key for key in (("epsilon",) if finished else ()) + ("delta", "accountant") if key not in summary]
    if missing:
        raise FedsimError(f"{source} lacks {', '.join(missing)}")
    ledger = PrivacyLedger(ledger_path)  # reads (never writes) the existing file
    try:
        total = ledger.total_event()
    except (KeyError, TypeError) as exc:  # a line without "event", or wrong fields
        raise FedsimError(f"{ledger_path}: malformed ledger entry ({exc})") from None
    claimed = summary.get("epsilon")  # None: an unfinished run has no claim to compare with
    if finished:
        claimed = math.inf if claimed is None or claimed in ("inf", "Infinity") else float(claimed)
    options = summary.get("accountant_options") or {}
    t0 = time.perf_counter()
    try:
        recomputed = compute_epsilon(total, float(summary["delta"]), summary["accountant"], **options)
    except (ValueError, TypeError) as exc:
        raise FedsimError(f"{summary_path}: cannot recompute epsilon ({exc})") from None
    seconds = time.perf_counter() - t0
    if not finished:
        match = True  # nothing claimed yet: epsilon spent so far is the answer
    elif math.isinf(claimed) or math.isinf(recomputed):
        match = claimed == recomputed
    else:
        match = abs(recomputed - claimed) <= MATCH_RTOL * max(abs(claimed), 1e-12)
    return {"run_dir": str(d), "releases": len(ledger), "accountant": summary["accountant"],
            "delta": float(summary["delta"]), "epsilon_summary": _num(claimed), "epsilon_ledger": _num(recomputed),
            "match": bool(match), "seconds": seconds, "finished": finished,
            "planned_steps": summary.get("planned_steps"), "target_epsilon": summary.get("target_epsilon")}


# --- output ---------------------------------------------------------------------------------------


def _fmt(x, spec=".4f") -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else format(x, spec)


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from fedsim.console import print_table

    print_table(columns, rows, title, right=("epsilon", "seconds", "sigma"), wrap=("note", "kind"))


def _validate(args) -> None:
    from fedsim.privacy.accounting import check_delta, check_positive, check_sampling_rate, check_steps

    for flag in ("q", "steps", "delta"):
        if getattr(args, flag) is None:
            raise UsageError(f"--{flag} is required (or give a RUN_DIR)")
    if args.find and args.epsilon is None:
        raise UsageError("--find sigma needs --epsilon")
    if not args.find and args.sigma is None:
        raise UsageError("--sigma is required (or --epsilon E --find sigma)")
    try:
        check_sampling_rate(args.q, "--q")
        check_steps(args.steps, "--steps")
        check_delta(args.delta, "--delta")
        check_positive(args.epsilon if args.find else args.sigma, "--epsilon" if args.find else "--sigma")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.k is not None and args.k < 1:
        raise UsageError(f"--k must be an integer >= 1, got {args.k}")
    if args.vdi is not None and not (0 < args.vdi < 1):
        raise UsageError(f"--vdi must be in (0, 1), got {args.vdi}")


def _run(args) -> int:
    if args.run_dir is not None:
        if any(getattr(args, f) is not None for f in ("q", "sigma", "steps", "delta", "epsilon", "find", "k")):
            raise UsageError("give either RUN_DIR or --q/--sigma/--steps/--delta, not both")
        results = [check_run_dir(str(d)) for d in run_dirs_of(args.run_dir)]
        if args.json:
            print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        else:
            for res in results:
                verdict = "matches" if res["match"] else "DOES NOT MATCH"
                print(f"{res['run_dir']}: {res['releases']} releases, accountant {res['accountant']},"
                      f" delta {res['delta']:g}")
                if not res["finished"]:
                    print(f"not finished (no summary.json): epsilon spent so far {_fmt(res['epsilon_ledger'], '.6g')}"
                          f" after {res['releases']} of {res['planned_steps']} planned releases"
                          f" (target {res['target_epsilon']})")
                    continue
                print(f"epsilon in summary.json: {_fmt(res['epsilon_summary'], '.6g')}; recomputed from the ledger: "
                      f"{_fmt(res['epsilon_ledger'], '.6g')} -> {verdict} (rtol {MATCH_RTOL:g})")
        return 0 if all(res["match"] for res in results) else 1

    _validate(args)
    names = [n.strip() for n in args.accountants.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_ACCOUNTANTS]
    if unknown or not names:
        raise UsageError(f"--accountants must be a subset of {','.join(ALL_ACCOUNTANTS)}, got {args.accountants!r}")
    vdi = args.vdi if args.vdi is not None else (1e-3 if args.k else 1e-4)
    setting = {"q": args.q, "steps": args.steps, "delta": args.delta, "k": args.k, "pld_vdi": vdi}
    what = f"q={args.q:g}, T={args.steps}, delta={args.delta:g}" + (f", k={args.k} (ELS)" if args.k else "")

    if args.find:
        rows = sigma_rows(args.q, args.steps, args.delta, args.epsilon, args.k, names, vdi)
        values, title = ["sigma", "epsilon_at_sigma"], f"noise multiplier for epsilon={args.epsilon:g} ({what})"
        mode = {"mode": "find-sigma", "target_epsilon": args.epsilon}
    else:
        rows, values = epsilon_rows(args.q, args.sigma, args.steps, args.delta, args.k, names, vdi), ["epsilon"]
        mode, title = {"mode": "epsilon", "sigma": args.sigma}, f"epsilon ({what}, sigma={args.sigma:g})"
    if args.json:
        print(json.dumps({"mode": mode["mode"], **setting, **mode,
                          "results": [{**r, **{v: _num(r[v]) for v in values}} for r in rows]}, indent=2))
    else:
        _print_table(title, ["accountant", "kind", *[v.replace("_", " ") for v in values], "seconds", "note"],
                     [[r["accountant"], r["kind"], *[_fmt(r[v]) for v in values], _fmt(r["seconds"], ".2f"), r["note"]]
                      for r in rows])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedsim account`; returns the exit code (2 for a user error)."""
    from fedsim.errors import FedsimError

    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        return _run(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except FedsimError as exc:  # a UsageError too
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
