"""Readable output: plain per-round lines without a terminal, a divergence warning, --version."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_piped_run_prints_one_plain_line_per_round_and_tables_in_80_columns(tmp_path):
    code = "import sys; sys.path.insert(0, '.'); from fedsim.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("ULS round ")]
    assert [r.split(":")[0] for r in rounds] == ["ULS round 1/3", "ULS round 2/3", "ULS round 3/3"]
    assert all("epsilon" in r and "eval loss" in r for r in rounds)
    start = next(line for line in lines if line.startswith("ULS: "))
    assert all(f in start for f in ("20 users", "q=0.25", "3 rounds", "sigma=", "target epsilon=8", "delta=0.001"))
    first = lines.index(next(line for line in lines if line.startswith("method")))
    table = lines[first:lines.index(next(line for line in lines if line.startswith("delta=")))]
    assert max(len(line) for line in table) <= 80


def test_a_diverging_run_is_warned_about_on_the_console_and_in_the_summary(tmp_path, capsys):
    from fedsim.cli import main

    assert main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}", "--set", "uls.client_lr=50",
                 "--set", "dp.clip_norm=100"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert "warning: eval loss diverged" in out
    assert any(w.startswith("eval loss diverged") for w in summary["warnings"])
    assert summary["eval_set"].startswith("held-out examples of the training users")


def test_a_run_that_learns_has_no_divergence_warning(tmp_path):
    from fedsim.cli import main

    assert main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert not any("diverged" in w for w in summary["warnings"])


def test_version(capsys):
    import pytest

    from fedsim import __version__
    from fedsim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fedsim {__version__}"
