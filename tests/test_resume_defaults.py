"""Resumable by default: checkpoints on, `fedsim account` on an unfinished run, refused resumes."""

import json

import pytest

from fedsim.cli import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={out}"]) == 0
    return out / "smoke"


def test_a_run_checkpoints_by_default_and_records_its_plan(smoke_run):
    from fedsim.config import load_config

    assert load_config("configs/default.yaml").run.checkpoint_every == 1
    assert json.loads((smoke_run / "checkpoint.json").read_text())["step"] == 3
    plan = json.loads((smoke_run / "plan.json").read_text())
    assert plan["accountant"] == "pld" and plan["planned_steps"] == 3 and plan["delta"] == 1e-3


def test_account_reports_epsilon_spent_so_far_for_an_unfinished_run(smoke_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "interrupted"
    shutil.copytree(smoke_run, run)
    (run / "summary.json").unlink()  # as if stopped after its last round, before the summary
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["account", str(run)]) == 0
    out = capsys.readouterr().out
    assert "not finished" in out and "after 3 of 3 planned releases" in out
    assert main(["account", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["finished"] is False and res["epsilon_ledger"] == pytest.approx(rows[-1]["epsilon"], rel=1e-9)
    (run / "plan.json").unlink()
    assert main(["account", str(run)]) == 2
    assert "neither summary.json" in capsys.readouterr().err


def test_resume_with_set_is_refused_and_changes_nothing(smoke_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(smoke_run, run)
    (run / "summary.json").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["run", "--resume", str(run), "--set", "run.rounds=40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set cannot change it" in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_compare_resume_refuses_a_single_run(smoke_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(smoke_run, run)
    (run / "summary.json").unlink()
    assert main(["compare", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a single run, not a comparison" in err[0] and "fedsim run --resume" in err[0]
    assert not (run / "uls").exists() and not (run / "compare.json").exists()
