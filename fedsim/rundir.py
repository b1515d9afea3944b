"""Run directories (resolved config, metrics, diagnostics, summary, weights), the cache
directory, atomic writes.

Per-round rows are split by what the DP guarantee covers (`RELEASED_FIELDS`):
  metrics.jsonl      released: round/step, epsilon spent, the plan's public values and values
                     computed from the noisy update. A deployment may publish it.
  diagnostics.jsonl  outside the guarantee: everything computed from unnoised user data (losses,
                     clipped fraction, realised counts, norms, failures, eval on the private
                     users' held-out text, wall time). Labelled so; never to be published.
A field is released only if it is listed: anything new lands in the diagnostics.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def cache_dir(*parts: str) -> Path:
    """$FEDSIM_CACHE_DIR (default ~/.cache/fedsim), joined with `parts`: derived data fedsim
    keeps between runs (pre-trained weights, de-quantised models, file indexes, LMO searches)."""
    return Path(os.environ.get("FEDSIM_CACHE_DIR") or Path.home() / ".cache" / "fedsim").expanduser().joinpath(*parts)


def atomic_write(path: Path, write) -> None:
    """`write(temporary path)`, fsync, then rename over `path`: a reader sees the old file or
    the whole new one, never a torn one; the temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Tensors to a safetensors file, atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def create_run_dir(cfg) -> Path:
    """<output_dir>/<name>, or <name>-2, -3, ... if taken: an existing run is never overwritten."""
    base = Path(cfg.run.output_dir)
    base.mkdir(parents=True, exist_ok=True)
    path, i = base / cfg.run.name, 1
    while True:
        try:
            path.mkdir()
            break
        except FileExistsError:
            i += 1
            path = base / f"{cfg.run.name}-{i}"
    atomic_write_text(path / "config.yaml", config_yaml(cfg))
    return path


def config_yaml(cfg) -> str:
    """The resolved config as written to a run directory's config.yaml."""
    return yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=False)


#: per-round fields covered by the guarantee (public plan values, or computed from the release)
RELEASED_FIELDS = frozenset({
    "round", "step", "epsilon", "q", "expected_cohort", "expected_batch", "noise_std", "expected_noise_norm",
    "update_norm",
    # adaptive clipping: the round's clip, the noisy unclipped share, the next clip (post-processing)
    "clip_norm", "noisy_unclipped_frac", "next_clip_norm",
})
#: the first line of diagnostics.jsonl
DIAGNOSTICS_HEADER = {
    "diagnostics": "SIMULATION ONLY - OUTSIDE THE DIFFERENTIAL-PRIVACY GUARANTEE. Every value here is computed from"
                   " unnoised user data (losses, clipped fractions, realised cohort and example counts, norms,"
                   " failures, evaluation on the private users' held-out text, wall time). A deployment must not"
                   " publish this file.",
}
METRICS, DIAGNOSTICS = "metrics.jsonl", "diagnostics.jsonl"


def split_row(row: dict) -> tuple[dict, dict]:
    """(released, diagnostic) parts of one per-round row; both keep its round/step key."""
    key = {k: row[k] for k in ("round", "step") if k in row}
    released = {k: v for k, v in row.items() if k in RELEASED_FIELDS}
    diagnostic = {**key, **{k: v for k, v in row.items() if k not in RELEASED_FIELDS}}
    return released, diagnostic


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(row)) + "\n")


class RunWriter:
    def __init__(self, path: Path, scalars=None):
        """`scalars`: also given every row (`add(row)`), e.g. fedsim/tensorboard_log.py's."""
        self.path = Path(path)
        self.scalars = scalars

    def append_metrics(self, row: dict) -> None:
        """One round's row: released fields to metrics.jsonl, the rest to diagnostics.jsonl."""
        released, diagnostic = split_row(row)
        _append_jsonl(self.path / METRICS, released)
        diag = self.path / DIAGNOSTICS
        if not diag.exists():
            _append_jsonl(diag, DIAGNOSTICS_HEADER)
        _append_jsonl(diag, diagnostic)
        if self.scalars is not None:
            self.scalars.add(row)

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(_jsonable(obj), indent=2) + "\n")

    def save_weights(self, tensors: dict, name: str = "final_weights.safetensors", metadata: dict | None = None) -> None:
        save_safetensors(self.path / name, tensors, metadata)


def _read_rows(p: Path) -> list[dict]:
    if not p.exists():
        return []
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "diagnostics" not in r]  # the header


def read_metrics(path: Path) -> list[dict]:
    """The released per-round rows (metrics.jsonl)."""
    return _read_rows(Path(path) / METRICS)


def read_diagnostics(path: Path) -> list[dict]:
    """The simulation-only per-round rows (diagnostics.jsonl, header skipped)."""
    return _read_rows(Path(path) / DIAGNOSTICS)


def split_metrics_for_resume(run_dir: Path, step: int, key: str = "round") -> None:
    """In metrics.jsonl and diagnostics.jsonl, keep the rows up to the checkpoint's `step` (by
    `key`); move later rows (a crashed timeline) to <name>.crashed.jsonl, never delete them."""
    for name in (METRICS, DIAGNOSTICS):
        p = Path(run_dir) / name
        if not p.exists():
            continue
        keep, later = [], []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                (keep if json.loads(line).get(key, 0) <= step else later).append(line)
        if later:
            with open(p.with_name(p.stem + ".crashed.jsonl"), "a", encoding="utf-8") as fh:
                fh.write("\n".join(later) + "\n")
        atomic_write_text(p, "\n".join(keep) + ("\n" if keep else ""))
