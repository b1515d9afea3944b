"""User mistakes: one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from fedsim.cli import main


@pytest.mark.parametrize("override,needle", [
    ("dp.epsilon=0", "dp.epsilon"), ("dp.delta=1", "dp.delta"), ("uls.expected_cohort=5000", "expected_cohort"),
    ("model.source=local", "model.path"), ("dp.nonsense=3", "dp.nonsense"),
])
def test_bad_config_exits_2_with_one_line(override, needle, tmp_path, capsys):
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}", "--set", "model.source=local",
               "--set", f"model.path={tmp_path / 'no-such-model'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-model" in err and "does not exist" in err


def test_console_script_entry_point_reports_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "configs/smoke.yaml", "--set", "dp.epsilon=-3",
                        "--set", f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "dp.epsilon" in p.stderr


def test_data_stats_prints_users_and_quantiles(capsys):
    assert main(["data", "stats", "configs/default.yaml"]) == 0
    out = capsys.readouterr().out
    assert "users: " in out and "p50=" in out
