"""`fedsim lmo-search` (:func:`main`): the offline LMO noise search (`fedsim.privacy.lmo.search`)
with a progress bar and a result cache: JSON under ``$FEDSIM_CACHE_DIR/lmo/`` (default
``~/.cache/fedsim/lmo/``), keyed by the setting and the search version, written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy.lmo import search as _search
from fedsim.privacy.lmo.search import (  # noqa: F401  (re-exported)
    ACCOUNTANTS, GRIDS, OBJECTIVES, PAPER_SEARCH_VARIANT, SEARCH_VERSION, LmoSearchResult, gaussian_reference)
from fedsim.rundir import atomic_write_text, cache_dir


class ResultCache:
    """One JSON file per search setting under :func:`cache_dir` (read at each call)."""

    @staticmethod
    def path(setting: dict) -> Path:
        blob = json.dumps({"v": SEARCH_VERSION, **setting}, sort_keys=True)
        return cache_dir("lmo", f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json")

    def load(self, setting: dict) -> LmoSearchResult | None:
        try:
            d = json.loads(self.path(setting).read_text(encoding="utf-8"))
            return LmoSearchResult.from_dict(d) if d.get("setting") == setting else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, result: LmoSearchResult) -> Path:
        path = self.path(result.setting)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def search(epsilon: float, delta: float, q: float, steps: int, dimension: int | None, objective: str = "variance",
           gamma: float = 0.9, accountant: str = "lmo_faithful", *, use_cache: bool = True, progress: bool = True,
           **options) -> LmoSearchResult:
    """`fedsim.privacy.lmo.search.search` with the JSON cache (`use_cache`) and a progress bar on
    a terminal (`progress`); a bad setting or an unreachable target raises ConfigError.
    `options`: grid, maxfev, top_k, compare_gaussian, k."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=not (progress and sys.stderr.isatty())) as bar:
        try:
            return _search.search(epsilon, delta, q, steps, dimension, objective, gamma, accountant,
                                  cache=ResultCache() if use_cache else None, progress=bar, **options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# -- CLI -----------------------------------------------------------------------------------------


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf"
    return f"{x:.5g}" if isinstance(x, float) else str(x)


def _print_result(res: LmoSearchResult) -> None:
    from fedsim.console import print_table

    s, g = res.setting, res.gaussian
    rows = [["parameters", ", ".join(f"{k}={v:.5g}" for k, v in res.params.to_dict().items()),
             f"sigma={_fmt(g.get('sigma_pld'))} (PLD); {_fmt(g['sigma_generic_rdp'])} (generic RDP)"],
            ["noise std / C", _fmt(res.noise_std), _fmt(g["noise_std"])],
            ["E|noise| / C", _fmt(res.expected_magnitude), _fmt(g["expected_magnitude"])],
            [f"usefulness P(|noise|<={s['gamma']:g} C)", _fmt(res.usefulness), _fmt(g["usefulness"])],
            ["epsilon, lmo_faithful (upper bound)", _fmt(res.epsilon_faithful), f"{s['epsilon']:g} (PLD)"]]
    for variant in ("per_step", "composed"):
        val = _fmt(res.epsilon_paper[variant]) if variant in res.epsilon_paper else "n/a (example-level only)"
        rows.append([f"epsilon, paper {variant.replace('_', '-')} (not a bound)", val, ""])
    print_table(["quantity", "LMO", "Gaussian"], rows, wrap=("quantity", "LMO", "Gaussian"),
                title=f"LMO search: eps={s['epsilon']:g}, delta={s['delta']:g}, q={s['q']:g}, steps={s['steps']},"
                      f" d={s['dimension']}, objective={s['objective']}, accountant={s['accountant']}"
                      + (f", ELS k={s['k']}" if s.get("k", 1) > 1 else ""))
    if math.isfinite(res.noise_std) and g.get("noise_std"):
        print(f"noise std ratio LMO/Gaussian: {res.noise_std / g['noise_std']:.4g}")


def main(argv: list[str] | None = None) -> int:
    """`fedsim lmo-search ...`; returns the exit code (2 on bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from fedsim.cli import ArgumentParser

    p = ArgumentParser(prog="fedsim lmo-search", description="Offline LMO-DP noise search (arXiv 2405.18776).")
    p.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    p.add_argument("--delta", type=float, required=True, help="target delta")
    p.add_argument("--q", type=float, required=True, help="Poisson sampling rate per round")
    p.add_argument("--steps", type=_positive_int, required=True, help="number of rounds")
    p.add_argument("--dimension", type=_positive_int, required=True, help="number of noised coordinates")
    p.add_argument("--k", type=_positive_int, default=1,
                   help="ELS: examples per user (q is then the example rate; default 1 = ULS / example level)")
    p.add_argument("--objective", choices=OBJECTIVES, default="variance")
    p.add_argument("--gamma", type=float, default=0.9, help="usefulness threshold, in units of C (default 0.9)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="lmo_faithful")
    p.add_argument("--grid", choices=GRIDS, default="coarse", help="the paper's grid: coarse (default), full, minimal")
    p.add_argument("--maxfev", type=int, default=80, help="Nelder-Mead evaluations after the grid (default 80)")
    p.add_argument("--no-gaussian", action="store_true", help="skip the Gaussian PLD calibration used for comparison")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write the result cache")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    try:
        args = p.parse_args(argv)
        res = search(args.epsilon, args.delta, args.q, args.steps, args.dimension, args.objective, args.gamma,
                     args.accountant, use_cache=not args.no_cache, grid=args.grid, maxfev=args.maxfev,
                     compare_gaussian=not args.no_gaussian, k=args.k)
    except FedsimError as exc:  # a bad command line (UsageError) too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        _print_result(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
