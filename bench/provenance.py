"""Where a bench result came from: date, commit, machine (for bench/out/*.json and RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:  # no git
        commit = None
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": f"{os.cpu_count()} shared CPU cores"}


def write_result(out: dict, path: str | Path) -> None:
    """Write a bench result as JSON to `path` (bench/out/...) and print it."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
