"""A run's outputs: TensorBoard scalars (`run.tensorboard: true`) match metrics.jsonl and
diagnostics.jsonl, a resume shows each round once, and docs/metrics.md documents every field."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

# the `test` extra installs tensorboard: these tests run in CI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedsim.cli import main
from fedsim.config import load_config
from fedsim.loop import resume, run_els, run_uls
from fedsim.rundir import DIAGNOSTICS, METRICS, read_diagnostics, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A smoke ULS run (checkpoint at round 2 of 3) and a small ELS run, both with TensorBoard."""
    base = tmp_path_factory.mktemp("tensorboard-runs")
    uls, _ = run_uls(load_config(SMOKE, [f"run.output_dir={base}", "run.name=uls", "run.tensorboard=true",
                                         "run.checkpoint_every=2"]), say=_quiet)
    els, _ = run_els(load_config(SMOKE, [f"run.output_dir={base}", "run.name=els", "run.tensorboard=true",
                                         "els.steps=2", "els.k=2", "els.expected_batch=8",
                                         "els.accounting_interval=0.1", "els.eval_every=1"]), say=_quiet)
    return {"round": uls, "step": els}


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(rows: list[dict], key: str, prefix: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for row in rows:
        for name, value in row.items():
            if name != key and isinstance(value, (int, float)):
                out.setdefault(f"{prefix}/{name}", []).append((row[key], float(value)))
    return out


@pytest.mark.parametrize("key", ["round", "step"])
def test_tensorboard_scalars_are_the_rows_of_metrics_and_diagnostics(runs, key):
    run_dir = runs[key]
    scalars = _scalars(run_dir)
    metrics = read_metrics(run_dir)
    expected = {**_expected(metrics, key, "released"), **_expected(read_diagnostics(run_dir), key, "diagnostics")}
    assert set(scalars) == set(expected)  # one tag per numeric field, released/ or diagnostics/ as split
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32
    # released/epsilon: one value per round/step, 0 before training, as in metrics.jsonl
    assert scalars["released/epsilon"][0] == (0, 0.0)
    assert [s for s, _ in scalars["released/epsilon"]] == [row[key] for row in metrics] == list(range(len(metrics)))
    assert "diagnostics/eval_loss" in scalars and "released/eval_loss" not in scalars


def test_a_resumed_run_shows_each_round_once(runs, tmp_path):
    """A crash after round 3 (summary.json not yet written): the resume re-does round 3 from the
    round-2 checkpoint, and its events file purges the first timeline's round 3."""
    run_dir = Path(shutil.copytree(runs["round"], tmp_path / "uls"))
    (run_dir / "summary.json").unlink()
    resume(run_dir, say=_quiet)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    rounds = [row["round"] for row in read_metrics(run_dir)]
    assert rounds == [0, 1, 2, 3]
    for tag, points in _scalars(run_dir).items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag} shows a round twice: {steps}"
        assert set(steps) <= set(rounds)


def test_missing_tensorboard_is_one_line_before_any_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails
    rc = main(["run", str(SMOKE), "--set", f"run.output_dir={tmp_path}", "--set", "run.tensorboard=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: run.tensorboard") and "pip install" in err[0]
    assert not any(tmp_path.iterdir())


# -- docs/metrics.md -------------------------------------------------------------------------------


def _doc_sections() -> dict[str, str]:
    """docs/metrics.md's `## \\`file\\`` sections, by file name."""
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    parts = re.split(r"^## `([^`]+)`.*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def _keys(obj: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in obj.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_docs_metrics_md_documents_every_field_of_a_run(runs):
    doc = _doc_sections()
    for run_dir in runs.values():
        files = {METRICS: [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()],
                 DIAGNOSTICS: [json.loads(line) for line in (run_dir / DIAGNOSTICS).read_text().splitlines()],
                 "summary.json": [json.loads((run_dir / "summary.json").read_text())]}
        for name, rows in files.items():
            keys = set().union(*(_keys(row) for row in rows))
            missing = sorted(k for k in keys if f"`{k}`" not in doc[name])
            assert not missing, f"docs/metrics.md, section {name}, does not document {missing}"


def _documented_files() -> set[str]:
    """The names in docs/metrics.md's `## Files` table (`a`, `b` in one cell count separately)."""
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    table = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    return {m for row in table.splitlines() if row.startswith("| `") for m in re.findall(r"`([^`]+)`", row.split("|")[1])}


def _pattern(name: str) -> str:
    """A file name as the table writes it: numbers become <N>, a sweep cell <cell>, seeds <s>."""
    name = re.sub(r"^checkpoint-r\d+", "checkpoint-r<N>", name)
    return re.sub(r"^seed-\d+", "seed-<s>", name)


def test_docs_metrics_md_lists_every_file_a_run_comparison_and_sweep_writes(runs, tmp_path):
    from fedsim.comparison import run_compare

    documented = _documented_files()
    out, _ = run_compare(load_config(SMOKE, [f"run.output_dir={tmp_path}", "els.k=2", "els.expected_batch=8",
                                             "els.accounting_interval=0.1", "run.tensorboard=true"]), say=_quiet)
    names = set()
    for d in (*runs.values(), out, *(p for p in out.iterdir() if p.is_dir())):
        names |= {_pattern(p.name) + ("/" if p.is_dir() else "") for p in d.iterdir()}
    sweep = {"sweep.json", "results.json", "results.csv", "results.parquet", "cells/<cell>/seed-<s>/",
             "cells/<cell>/seed-<s>.log", "report/"}
    from fedsim import sweeps as sweep_module

    assert {"sweep.json", "results.json", "results.csv", "results.parquet"} <= set(re.findall(
        r'"([a-z]+\.(?:json|csv|parquet))"', Path(sweep_module.__file__).read_text()))  # the names the code writes
    missing = sorted(n for n in names | sweep if n not in documented)
    assert not missing, f"docs/metrics.md's Files table does not list {missing}"
    plan = json.loads((runs["step"] / "plan.json").read_text())
    doc = _doc_sections()["summary.json"]
    assert not [k for k in plan if f"`{k}`" not in doc], "plan.json's fields are summary.json's"
