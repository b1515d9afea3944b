"""fedsim: simulate federated fine-tuning of language models with user-level DP.

The Python API runs what the CLI runs and returns what it writes::

    import fedsim
    summary = fedsim.run("configs/smoke.yaml", overrides=["dp.epsilon=4"])   # summary.json
    result = fedsim.compare("configs/smoke.yaml")                            # compare.json
    rows = fedsim.sweep("configs/smoke.yaml", grid={"dp.epsilon": [2, 8]}, seeds=2)  # results.json rows
    audit = fedsim.audit("configs/smoke.yaml", method="els", canaries=500)   # audit.json

`config` is a YAML path, a dict of sections, or an `ExperimentConfig`. Heavy libraries (torch,
flwr, ray) are imported on the first call, not on `import fedsim`.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(config, overrides=()):
    """An `ExperimentConfig` from a path, a dict or a config, with `--set`-style overrides
    (relative paths in a dict: to the working directory)."""
    from fedsim.config import ExperimentConfig, config_from_dict, load_config

    if isinstance(config, ExperimentConfig):
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(config, list(overrides))


def run(config, method: str = "uls", overrides=(), say=print) -> dict:
    """`fedsim run CONFIG [--method els]`: one run; returns its summary (summary.json) with
    `run_dir` added."""
    from fedsim.loop import run as run_method

    run_dir, summary = run_method(load(config, overrides), method.upper(), say)
    return {**summary, "run_dir": str(run_dir)}


def compare(config, overrides=(), say=print) -> dict:
    """`fedsim compare CONFIG`: ULS, ELS and the non-private reference; returns compare.json's
    content with `dir` added."""
    from fedsim.comparison import run_compare

    out, result = run_compare(load(config, overrides), say)
    return {**result, "dir": str(out)}


def sweep(config, grid: dict | None = None, seeds: int | None = None, methods=None, jobs: int | None = None,
          out: str | None = None, overrides=(), say=print) -> list[dict]:
    """`fedsim sweep CONFIG`: every cell of `grid` (default: the config's sweep.grid) x seeds;
    returns the rows of results.json (one per run). `config` must be a YAML path: the sweep
    directory records it so that `fedsim sweep --resume` can rebuild every cell."""
    import os

    from fedsim.errors import ConfigError
    from fedsim.sweeps import cells, default_jobs, run_sweep, start_sweep

    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError("fedsim.sweep needs the config as a YAML path (the sweep directory records it for --resume)")
    base = load(config, overrides)
    grid = {k: list(v) for k, v in (grid if grid is not None else base.sweep.grid).items()}
    s = start_sweep(str(config), list(overrides), grid, seeds or base.sweep.seeds,
                    list(methods or base.compare.methods), out)
    first = s.config_for(cells(s.grid)[0], 0)
    return run_sweep(s, jobs or first.sweep.jobs or default_jobs(first), say)


def audit(config, method: str = "uls", canaries: int | None = None, kind: str | None = None, overrides=(),
          say=print) -> dict:
    """`fedsim audit CONFIG`: one run with canary users and its privacy audit; returns audit.json's
    content (the verdict, the one-run lower bound, the one-shot estimates) with `run_dir`."""
    from fedsim.auditing.auditor import run_audit

    _, result = run_audit(load(config, overrides), method, canaries, kind, say)
    return result
