"""User mistakes: one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from fedsim.cli import main


@pytest.mark.parametrize("override,needle", [
    ("dp.epsilon=0", "dp.epsilon"), ("dp.delta=1", "dp.delta"), ("uls.expected_cohort=5000", "expected_cohort"),
    ("model.source=local", "model.path"), ("dp.nonsense=3", "dp.nonsense"),
    ("dp.epsilon=-1", "dp.epsilon"), ("dp.delta=0", "dp.delta"), ("dp.clip_norm=0", "dp.clip_norm"),
    ("run.rounds=0", "run.rounds"), ("dp.epsilon=abc", "dp.epsilon"), ("nosection.key=1", "nosection"),
])
def test_bad_config_exits_2_with_one_line(override, needle, tmp_path, capsys):
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert len(err[0]) < 400  # names the key; never dumps the whole config
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


@pytest.mark.parametrize("content,needle", [
    (b"dp: {nonsense: 1}\n", "dp.nonsense: unknown key"),
    (b"foo: {a: 1}\n", "foo: unknown key"),
    (b"dp: [unclosed\n", "not valid YAML (line 2, column 1"),
    (b"run: {name: \xff}\n", "not valid UTF-8"),
    (b"- just\n- a list\n", "top level must be a mapping"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, capsys, content, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    rc = main(["run", str(cfg)])
    line = _one_error_line(capsys)
    assert rc == 2 and needle in line and str(cfg) in line
    assert rc == main(["run", str(tmp_path / "missing.yaml")]) and "missing.yaml not found" in _one_error_line(capsys)


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


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("files,needle", [
    ({"config.json": b"{ this is not json"}, "config.json: corrupt model config"),
    ({"config.json": b"{}"}, "has no model weights"),
    ({"config.json": b"{}", "model.safetensors": b"garbage" * 10}, "model.safetensors: corrupt model weights"),
    ({"config.json": b"{}", "model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":\"F32\","
      b"\"shape\":[4],\"data_offsets\":[0,16]}}" + b"\x00" * 4}, "model.safetensors: corrupt model weights"),  # truncated
    ({"config.json": b"{}", "model.safetensors": b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "tokenizer.json": b'{"model": '},
     "tokenizer.json: corrupt tokenizer file"),
])
def test_corrupt_model_directory_is_a_clear_error(tmp_path, capsys, files, needle):
    model = tmp_path / "broken-model"
    model.mkdir()
    for name, data in files.items():
        (model / name).write_bytes(data)
    out = tmp_path / "runs"
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={out}", "--set", "model.source=local",
               "--set", f"model.path={model}"])
    line = _one_error_line(capsys)
    assert rc == 2 and needle in line and "broken-model" in line
    assert not out.exists() or not any(out.iterdir())  # refused before a run directory was made


@pytest.mark.parametrize("content,extra,needle", [
    (b'{"user_id": 1, "text": "a"}\n{"user_id": 2, "text": "b"\n', [], "users.jsonl: line 2: malformed JSON"),
    (b'{"author": 1, "text": "a"}\n', [], "users.jsonl: line 1: no user column 'user_id'"),
    (b'{"user_id": 1, "text": "a"}\n{"user_id": 2, "text": "b\xff"}\n', [], "users.jsonl: line 2: not valid UTF-8"),
    (b'{"user_id": 1, "text": "a"}\n{"user_id": 2, "text": "' + b"x" * 5000 + b'"}\n', ["data.max_example_bytes=1000"],
     "users.jsonl"),
    (b"", [], "users.jsonl: the file is empty"),
])
def test_bad_data_files_through_the_cli(tmp_path, capsys, content, extra, needle):
    data = tmp_path / "users.jsonl"
    data.write_bytes(content)
    out = tmp_path / "runs"
    args = ["run", "configs/smoke.yaml", "--set", f"run.output_dir={out}", "--set", "data.source=files",
            "--set", f"data.path={data}", "--set", "data.min_examples=1"]
    for e in extra:
        args += ["--set", e]
    rc = main(args)
    line = _one_error_line(capsys)
    assert rc == 2 and needle in line
    assert not out.exists() or not any(out.iterdir())  # refused before a run directory was made
    assert data.read_bytes() == content  # the input is never touched


def test_delta_at_least_one_over_users_warns():
    from fedsim.config import load_config
    from fedsim.plan import plan_uls

    fixed_noise = ["dp.noise_multiplier=1", "dp.epsilon=null"]  # no calibration: the warning is about delta
    cfg = load_config("configs/smoke.yaml", ["dp.delta=0.06", *fixed_noise])  # 20 users: 1/N = 0.05
    plan = plan_uls(cfg, 20)
    assert any("leak one user's data" in w for w in plan.warnings)
    assert not any("leak one user's data" in w
                   for w in plan_uls(load_config("configs/smoke.yaml", ["dp.delta=0.01", *fixed_noise]), 20).warnings)


def test_an_existing_run_directory_is_never_overwritten(tmp_path):
    from fedsim.config import load_config
    from fedsim.rundir import create_run_dir

    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}"])
    first = create_run_dir(cfg)
    (first / "summary.json").write_text('{"precious": true}')
    second = create_run_dir(cfg)
    assert second != first and second.name == "smoke-2"
    assert (first / "summary.json").read_text() == '{"precious": true}'


def test_a_failing_run_never_touches_an_existing_run_directory(tmp_path, capsys):
    out = tmp_path / "runs"
    old = out / "smoke"  # an earlier run of the same name
    old.mkdir(parents=True)
    precious = {"summary.json": b'{"precious": true}', "privacy_ledger.jsonl": b'{"step": 1}\n', "config.yaml": b"x: 1\n"}
    for name, data in precious.items():
        (old / name).write_bytes(data)
    bad = tmp_path / "users.jsonl"
    bad.write_bytes(b'{"author": 1, "text": "a"}\n')
    for extra in (["data.source=files", f"data.path={bad}"], ["dp.delta=2"], ["model.source=local", f"model.path={tmp_path}"]):
        rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={out}", *sum([["--set", e] for e in extra], [])])
        assert rc == 2 and _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["smoke"]  # no half-made smoke-2 either
    assert {p.name: p.read_bytes() for p in old.iterdir()} == precious


def test_delta_at_least_one_over_users_warns_through_the_cli(tmp_path, capsys):
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={tmp_path}", "--set", "dp.delta=0.06",
               "--set", "run.rounds=1", "--set", "dp.noise_multiplier=1", "--set", "dp.epsilon=null"])
    out = capsys.readouterr().out
    assert rc == 0  # a warning, not an error
    assert "warning: dp.delta=0.06 >= 1/users=0.05" in out


# -- a corrupt checkpoint: `fedsim run --resume` refuses it, exit 2, and changes no file ------------
@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One small ULS and one small ELS run directory with checkpoints (copied per test)."""
    from fedsim.config import load_config
    from fedsim.loop import run_els
    from fedsim.loop import run_uls

    base = tmp_path_factory.mktemp("ckpt-runs")
    quiet = lambda *_: None  # noqa: E731
    uls, _ = run_uls(load_config("configs/smoke.yaml", [f"run.output_dir={base / 'uls'}", "run.rounds=2",
                                                         "run.checkpoint_every=1"]), say=quiet)
    els, _ = run_els(load_config("configs/smoke.yaml", [f"run.output_dir={base / 'els'}", "els.steps=2", "els.k=2",
                                                         "els.expected_batch=8", "els.accounting_interval=0.1",
                                                         "run.checkpoint_every=1"]), say=quiet)
    return {"ULS": uls, "ELS": els}


def _break_tensors(d):
    t = next(d.glob("checkpoint-r*.safetensors"))
    t.write_bytes(t.read_bytes()[:-10] + b"0123456789")
    return t.name


def _drop_tensors(d):
    next(d.glob("checkpoint-r*.safetensors")).unlink()
    return "checkpoint.json"


def _pointer_not_json(d):
    (d / "checkpoint.json").write_text("{ torn")
    return "checkpoint.json"


def _pointer_without_optimizer(d):
    import json

    p = json.loads((d / "checkpoint.json").read_text())
    del p["optimizer"]
    (d / "checkpoint.json").write_text(json.dumps(p))
    return "checkpoint.json"


def _no_pointer(d):
    (d / "checkpoint.json").unlink()
    return "no checkpoint"


@pytest.mark.parametrize("method", ["ULS", "ELS"])
@pytest.mark.parametrize("damage,needle", [
    (_break_tensors, "corrupt checkpoint (sha256"), (_drop_tensors, "is missing"),
    (_pointer_not_json, "corrupt checkpoint pointer"), (_pointer_without_optimizer, "corrupt checkpoint pointer"),
    (_no_pointer, "set run.checkpoint_every"), (None, "already finished"),
])
def test_corrupt_checkpoint_through_the_cli(finished_runs, tmp_path, capsys, method, damage, needle):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(finished_runs[method], d)
    if damage is not None:  # as if the run had crashed: no summary yet, then the checkpoint is damaged
        (d / "summary.json").unlink()
        names = damage(d)
    else:
        names = "summary.json"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    rc = main(["run", "--resume", str(d)])
    line = _one_error_line(capsys)
    assert rc == 2 and needle in line and str(d) in line and names in line
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing written, moved or removed


def test_fedsim_account_rechecks_uls_els_lmo_and_compare_directories_in_a_fresh_process(finished_runs, tmp_path):
    # the installed `fedsim` command in a fresh interpreter: every accountant is found from the
    # name a summary.json gives (none registers itself on import); a `fedsim compare` directory
    # (uls/ and els/ runs side by side) is rechecked method by method; an LMO run by lmo_faithful
    import json
    import shutil
    from pathlib import Path

    from fedsim.config import load_config
    from fedsim.loop import run_uls

    compare_dir = tmp_path / "compare"
    for method, sub in (("ULS", "uls"), ("ELS", "els")):
        shutil.copytree(finished_runs[method], compare_dir / sub)
    lmo = {"a1": 0.0, "a3": 0.0, "a4": 1.0, "G_k": 1.0, "G_theta": 1.0, "E_lambda": 1.0, "U_a": 0.9, "U_b": 1.0}
    lmo_dir, _ = run_uls(load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path / 'lmo'}", "run.rounds=2",
                                                            "dp.mechanism=lmo", "dp.epsilon=null",
                                                            f"dp.lmo={json.dumps(lmo)}"]), say=lambda *_: None)
    fedsim = shutil.which("fedsim") or str(Path(sys.executable).parent / "fedsim")
    for target, accountants in ((compare_dir, ["pld", "pld"]), (lmo_dir, ["lmo_faithful"])):
        p = subprocess.run([fedsim, "account", str(target)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-1500:]
        assert "Traceback" not in p.stderr and p.stdout.count("-> matches") == len(accountants)
        assert [line.split("accountant ")[1].split(",")[0] for line in p.stdout.splitlines()
                if "accountant " in line] == accountants
