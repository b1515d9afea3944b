"""`fedsim sweep`, the non-private reference of `fedsim compare`, the Python API and the 80-column tables."""

import csv
import json
import math
import subprocess
import sys

import pytest

from fedsim.config import load_config
from fedsim.sweeps import COLUMNS, cell_name, cells, parse_grid

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
FAST = ["els.k=2", "els.expected_batch=8", "els.accounting_interval=0.1"]  # quick ELS calibrations
SETS = [a for o in FAST for a in ("--set", o)]


def test_grid_parsing_cells_and_names():
    grid = parse_grid(["dp.epsilon=1,2.5", "compare.budget=100"])
    assert grid == {"dp.epsilon": [1, 2.5], "compare.budget": [100]}
    assert [cell_name(c) for c in cells(grid)] == ["dp.epsilon=1,compare.budget=100", "dp.epsilon=2.5,compare.budget=100"]
    assert cells({}) == [{}] and cell_name({}) == "base"
    for bad in ("dp.epsilon", "=1,2", "dp.epsilon="):
        with pytest.raises(Exception, match="key.path=value1,value2"):
            parse_grid([bad])


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """2 cells (epsilon 2 and 8) x 2 seeds x (ULS, ELS, non-private), in 2 worker processes."""
    from fedsim.cli import main

    out = tmp_path_factory.mktemp("sweep") / "s"
    rc = main(["sweep", "configs/smoke.yaml", "--grid", "dp.epsilon=2,8", "--seeds", "2", "--jobs", "2",
               "--out", str(out), *SETS])
    assert rc == 0
    return out


def test_sweep_writes_one_row_per_run_with_the_documented_columns(tiny_sweep):
    res = json.loads((tiny_sweep / "results.json").read_text())
    rows = res["rows"]
    assert len(rows) == 2 * 2 * 3 and res["methods"] == ["ULS", "ELS", "non-private"]
    assert res["columns"] == [*COLUMNS[:3], "dp.epsilon", *COLUMNS[3:]]
    for r in rows:
        assert r["status"] == "completed" and set(res["columns"]) <= set(r)
        assert (tiny_sweep / r["run_dir"] / "summary.json").is_file()
        if r["method"] == "non-private":
            assert r["epsilon"] is None and r["target_epsilon"] is None
        else:
            assert r["epsilon"] <= r["dp.epsilon"] == r["target_epsilon"]
    # each seed's run.seed differs; the same seed in both cells shares one non-private run
    refs = {(r["cell"], r["seed"]): r["run_dir"] for r in rows if r["method"] == "non-private"}
    assert refs[("dp.epsilon=2", 0)] == refs[("dp.epsilon=8", 0)] != refs[("dp.epsilon=2", 1)]
    seeds = {json.loads((tiny_sweep / r["run_dir"] / "summary.json").read_text())["eval_loss_after"]
             for r in rows if r["method"] == "ULS"}
    assert len(seeds) == 4
    with open(tiny_sweep / "results.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["run_dir"] for r in csv_rows] == [r["run_dir"] for r in rows]
    import pyarrow.parquet as pq

    assert pq.read_table(tiny_sweep / "results.parquet").num_rows == len(rows)


def test_resume_of_a_finished_sweep_runs_nothing(tiny_sweep, capsys):
    from fedsim.cli import main

    before = {p: p.stat().st_mtime_ns for p in tiny_sweep.glob("cells/*/*/compare.json")}
    assert main(["sweep", "--resume", str(tiny_sweep)]) == 0
    assert "4 of 4 comparisons finished before; skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tiny_sweep.glob("cells/*/*/compare.json")} == before


@pytest.mark.slow  # ~1 min: two sweeps in subprocesses, one killed
def test_sweep_resume_continues_a_killed_comparison_and_skips_the_finished_one(tmp_path):
    """One cell's worker SIGKILLs itself right after recording ULS round 2's release; the other
    cell finishes; `--resume` continues the killed one from its checkpoint (the ledger keeps
    each release once: reproducible mode re-does round 3 identically) and skips the finished one."""
    out = tmp_path / "s"
    code = ("import sys; sys.path.insert(0, '.'); from fedsim.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["sweep", "configs/smoke.yaml", "--grid", "simulation.faults.server_crash_round=2,null", "--methods", "uls",
            "--jobs", "2", "--out", str(out)]
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "killed by signal 9" in p.stderr
    killed, finished = out / "cells" / "simulation.faults.server_crash_round=2" / "seed-0", \
        out / "cells" / "simulation.faults.server_crash_round=None" / "seed-0"
    assert not (killed / "compare.json").exists() and (finished / "compare.json").is_file()
    stamp = (finished / "compare.json").stat().st_mtime_ns
    p = subprocess.run([sys.executable, "-c", code, "sweep", "--resume", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (finished / "compare.json").stat().st_mtime_ns == stamp
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    ledger = (killed / "uls" / "privacy_ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 3 and rows[0]["steps"] == 3


@pytest.mark.parametrize("args,needle", [
    (["--grid", "dp.nope=1,2"], "dp.nope: unknown key"),
    (["--grid", "dp.epsilon=-1,2"], "dp.epsilon"),
    (["--grid", "dp.epsilon"], "key.path=value1,value2"),
    (["--seeds", "0"], "--seeds"),
    (["--methods", "uls,foo"], "--methods"),
])
def test_bad_sweeps_are_one_line_errors_and_write_nothing(tmp_path, capsys, args, needle):
    from fedsim.cli import main

    rc = main(["sweep", "configs/smoke.yaml", "--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "s").exists()


def test_compare_has_a_non_private_row_and_its_table_fits_80_columns(tmp_path, capsys):
    from fedsim.comparison import run_compare

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", *FAST])
    out, result = run_compare(cfg, say=lambda *_: None)
    table = capsys.readouterr().out
    assert result["methods"] == ["uls", "els", "non-private"] and (out / "reference" / "summary.json").is_file()
    ref = result["reference"]
    assert ref["target_epsilon"] is None and ref["noise_multiplier"] == 0 and ref["mechanism"]["clip_norm"] == 1.0
    assert ref["steps"] == result["uls"]["steps"]  # the same compute in ULS's shape
    lines = table.splitlines()
    assert any(line.startswith("non-private") for line in lines)
    assert max(len(line) for line in lines) <= 80 and "…" not in table
    # without clipping: the clip norm is infinite, the reference still runs and reports no epsilon
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path / 'noclip'}", "compare.methods=[non-private]",
                                             "compare.reference_clip=false"])
    out, result = run_compare(cfg, say=lambda *_: None)
    assert result["methods"] == ["non-private"] and math.isinf(result["reference"]["mechanism"]["clip_norm"])
    assert load_config(out / "reference" / "config.yaml").dp.clip_norm == math.inf  # inf survives config.yaml


def test_the_python_api_returns_what_the_cli_writes(tmp_path):
    """fedsim.run on the smoke config (reproducible) equals `fedsim run`'s summary.json."""
    import fedsim
    from fedsim.cli import main

    assert main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path / 'cli'}"]) == 0
    cli = json.loads((tmp_path / "cli" / "smoke" / "summary.json").read_text())
    api = fedsim.run("configs/smoke.yaml", overrides=[f"run.output_dir={tmp_path / 'api'}"], say=lambda *_: None)
    from fedsim.rundir import _jsonable

    volatile = {"wall_time_s", "time_per_step_s", "run_dir"}
    assert json.loads(json.dumps(_jsonable({k: v for k, v in api.items() if k not in volatile}))) == \
           {k: v for k, v in cli.items() if k not in volatile}
    assert fedsim.load({"run": {"rounds": 2}}).run.rounds == 2
    import fedsim.comparison  # noqa: F401 - importing the modules must not shadow the API's functions
    import fedsim.auditing.auditor  # noqa: F401
    import fedsim.sweeps  # noqa: F401

    assert all(callable(getattr(fedsim, name)) for name in ("run", "compare", "sweep", "audit", "load"))


@pytest.mark.parametrize("command", ["run", "data", "account", "lmo-search", "compare", "sweep", "report", "config",
                                     "audit"])
def test_every_command_has_help(command, capsys):
    from fedsim.cli import main

    argv = [command, "stats", "--help"] if command == "data" else [command, "--help"]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's --help exits
        rc = exc.code
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("usage: fedsim") and len(out.splitlines()) > 3


def test_account_table_fits_80_columns_without_cutting_a_number(capsys):
    from fedsim.cli import main

    assert main(["account", "--q", "0.001", "--sigma", "1.1", "--steps", "100", "--delta", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    assert any(line.startswith("pld") for line in out.splitlines())


def test_unmatched_compute_is_a_console_and_summary_warning(tmp_path, capsys):
    from fedsim.comparison import run_compare

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "els.k=4", "els.expected_batch=64",
                                             "els.accounting_interval=0.1", "compare.methods=[uls,els]"])
    out, result = run_compare(cfg)  # budget 94: ULS 3 rounds, ~95 example gradients; ELS 1 step of 64
    console = capsys.readouterr().out
    assert "warning: unmatched compute" in console
    for m in ("uls", "els"):
        assert any(w.startswith("unmatched compute") for w in result[m]["warnings"])
