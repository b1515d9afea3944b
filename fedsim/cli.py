"""`fedsim run | compare | account | lmo-search | data | report`.

Heavy imports (torch, flwr, ray, peft) happen inside the subcommands. A user mistake
(`FedsimError`) prints one line `error: ...` and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from fedsim.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit code 2, not argparse's usage dump
        raise UsageError(message)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="configs/default.yaml", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set dp.epsilon=2 (repeatable)")


def cmd_run(args) -> int:
    from fedsim.config import load_config
    from fedsim.loop import resume, run

    if args.resume:
        if args.overrides:  # rounds, clip, noise and budget are the plan the ledger was spent under
            from fedsim.errors import ConfigError

            raise ConfigError("--resume continues a run with its own config.yaml; --set cannot change it"
                              " (start a new run to change the config)")
        run_dir, summary = resume(args.resume)
    else:
        run_dir, summary = run(load_config(args.config, args.overrides), args.method)
    from fedsim.comparison import print_results

    print_results([(summary["method"], summary)])
    print(f"run directory: {run_dir}")
    if not str(summary["stop_reason"]).startswith("completed"):
        print(f"note: {summary['stop_reason']}")
    return 0


def cmd_data(args) -> int:
    import numpy as np

    from fedsim.config import load_config
    from fedsim.data import build_store, report_notes

    cfg = load_config(args.config, args.overrides)
    store = build_store(cfg.data)
    sizes = np.asarray(store.example_counts())  # large stores count without generating any user's examples
    ps = (0, 10, 25, 50, 75, 90, 99, 100)
    where = f" ({cfg.data.path})" if cfg.data.source == "files" else ""
    print(f"source: {cfg.data.source}{where}\nusers: {store.num_users}\nexamples: {int(sizes.sum())}")
    print("examples per user quantiles: " + ", ".join(f"p{p}={v:g}" for p, v in zip(ps, np.percentile(sizes, ps))))
    if pub := store.public_examples():
        print(f"public examples (pre-training): {len(pub)}" + (f" ({cfg.data.public_path})" if cfg.data.public_path
                                                               else ""))
    for line in report_notes(store.data_report()):  # what was left out or cut, and why
        print(f"note: {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog="fedsim", description="Federated fine-tuning with user-level DP: ULS vs ELS.")
    from fedsim import __version__

    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run an experiment (ULS on Flower)")
    _add_config_args(p_run)
    p_run.add_argument("--resume", metavar="RUN_DIR", help="continue a run (ULS or ELS) from its last checkpoint")
    p_run.add_argument("--method", choices=["uls", "els"], default="uls",
                       help="uls: DP-FedAvg on Flower (default); els: the centralized ELS baseline alone")
    p_data = sub.add_parser("data", help="inspect the user store of a config")
    p_data.add_argument("what", choices=["stats"])
    _add_config_args(p_data)
    sub.add_parser("account", help="epsilon from every accountant; `fedsim account -h`", add_help=False)
    sub.add_parser("lmo-search", help="offline LMO noise search; `fedsim lmo-search -h`", add_help=False)
    sub.add_parser("compare", help="ULS vs ELS at matched (epsilon, delta) and compute; `fedsim compare -h`", add_help=False)
    sub.add_parser("audit", help="canary users and one-run lower bounds on epsilon; `fedsim audit -h`", add_help=False)
    sub.add_parser("sweep", help="a grid of comparisons over seeds; `fedsim sweep -h`", add_help=False)
    sub.add_parser("report", help="figures and a Markdown/HTML report of a sweep or compare directory; `fedsim report -h`",
                   add_help=False)

    sub.add_parser("config", help="every config key: value, default, allowed values, meaning; `fedsim config -h`",
                   add_help=False)

    # subcommands with their own parsers take the rest of the line
    external = {"account": "fedsim.account", "lmo-search": "fedsim.lmo_search", "compare": "fedsim.comparison",
                "report": "fedsim.report", "sweep": "fedsim.sweeps", "audit": "fedsim.auditing.auditor"}
    external["config"] = "fedsim.config_reference"
    if argv and argv[0] in external:
        import importlib

        # `fedsim compare` stops after a round/step on Ctrl-C; `fedsim sweep` keeps its own handling
        return _guard(lambda: importlib.import_module(external[argv[0]]).main(argv[1:]),
                      stop_between_rounds=argv[0] in ("compare", "audit"))
    args = parser.parse_args(argv)
    return _guard(lambda: {"run": cmd_run, "data": cmd_data}[args.command](args), stop_between_rounds=args.command == "run")


def _guard(fn, stop_between_rounds: bool = False) -> int:
    """`fn()`'s exit code; a FedsimError is one `error:` line (2), an interruption one line (130).
    `stop_between_rounds`: SIGINT/SIGTERM stop a training loop after its round/step, resumably
    (fedsim/interrupt.py)."""
    import contextlib

    from fedsim import interrupt
    from fedsim.errors import FedsimError

    try:
        with interrupt.handling() if stop_between_rounds else contextlib.nullcontext():
            return int(fn() or 0)
    except FedsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # RunInterrupted: after a round/step; otherwise during set-up
        print(interrupt.message(exc), file=sys.stderr)
        return interrupt.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
