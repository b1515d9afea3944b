"""User stores that scale: the lazy synthetic population and the indexed file store."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsim.config import DataConfig
from fedsim.data import build_store
from fedsim.data import files as files_mod
from fedsim.data.files import FileUserStore
from fedsim.data.synthetic import SyntheticTokenStore, split_test_count
from fedsim.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


# ---- synthetic --------------------------------------------------------------------------
def test_synthetic_is_a_function_of_seed_and_user():
    a = SyntheticTokenStore(10**6, seed=3, cache_users=0)
    b = SyntheticTokenStore(10**6, seed=3, cache_users=0)
    users = [0, 17, 123_456, 999_999]
    first = {u: (a.train_examples(u), a.test_examples(u)) for u in users}
    for u in reversed(users):  # call order and other users do not matter
        b.train_examples(12345)
        assert (b.train_examples(u), b.test_examples(u)) == first[u]
    c = SyntheticTokenStore(10**6, seed=4)
    assert c.train_examples(17) + c.test_examples(17) != first[17][0] + first[17][1]
    for u in users:
        tr, te = first[u]
        assert len(tr) + len(te) == a.num_examples(u)
        assert len(te) == split_test_count(a.num_examples(u), 0.2)
        assert all(len(x.encode()) == 64 for x in tr + te)
    with pytest.raises(IndexError):
        a.train_examples(10**6)


def test_synthetic_counts_follow_a_power_law():
    s = SyntheticTokenStore(200_000, seed=0, min_examples=2, max_examples=10_000, alpha=1.2)
    n = s.example_counts()
    assert n.min() == 2 and n.max() <= 10_000
    assert np.median(n) <= 4 and n.max() >= 100 * np.median(n)  # heavy tail
    for k in (10, 100, 1000):  # survival P(n >= k) = (m / k)^alpha below the cap
        expected = (2 / k) ** 1.2
        assert abs((n >= k).mean() / expected - 1) < 0.15, k
    assert [s.num_examples(u) for u in (5, 77)] == n[[5, 77]].tolist()
    assert s.total_examples(chunk=30_000) == int(n.sum())
    fixed = SyntheticTokenStore(1000, examples_per_user=7)
    assert set(fixed.example_counts().tolist()) == {7}


def test_synthetic_users_have_their_own_distribution():
    s = SyntheticTokenStore(1000, seed=1, min_examples=200, max_examples=200, topics=4)
    words = {u: " ".join(s.train_examples(u)).split() for u in (3, 4)}
    for u, other in ((3, 4), (4, 3)):
        mix = s.user_mixture(u)
        top = mix["topic_words"][int(np.argmax(mix["weights"]))]
        own, theirs = words[u].count(top) / len(words[u]), words[other].count(top) / len(words[other])
        assert own > 3 * theirs + 0.01


def test_synthetic_population_is_lazy():
    tracemalloc.start()
    t0 = time.perf_counter()
    s = SyntheticTokenStore(10**6, seed=0)
    elapsed = time.perf_counter() - t0
    built = tracemalloc.get_traced_memory()[1]
    for u in range(0, 10**6, 10**4):  # reading 100 users keeps only a small LRU
        s.train_examples(u)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2.0
    assert built < 4 * 2**20  # the vocabulary only: nothing per user
    assert peak < 8 * 2**20
    big = SyntheticTokenStore(10**9, seed=0)  # a billion users cost the same
    assert big.num_users == 10**9 and len(big.train_examples(10**9 - 1)) >= 1


def test_benchmark_workload_store():
    s = SyntheticTokenStore.benchmark()
    assert s.num_users == 2000
    for u in (0, 1999):
        tr = s.train_examples(u)
        assert len(tr) == 8 and all(len(x.encode()) == 64 for x in tr)
        assert len(s.test_examples(u)) == 2


def test_build_store_synthetic():
    cfg = DataConfig(source="synthetic", num_users=5000, seed=2, min_examples=3, seq_len=32, max_users=100)
    s = build_store(cfg)
    assert isinstance(s, SyntheticTokenStore) and s.num_users == 100
    assert s.example_counts().min() == 3 and len(s.train_examples(0)[0]) == 32
    fixed = build_store(DataConfig(source="synthetic", num_users=50, examples_per_user=10))
    assert len(fixed.train_examples(9)) == 8


# ---- file store ----------------------------------------------------------------------
TEXTS = ["plain", "comma, inside", 'quote " inside', "two\nlines", "ünïcödé ✓", "tab\there", "x" * 300]


def _rows(n_users: int = 40, seed: int = 0) -> tuple[list[tuple[int, str]], dict[str, list[str]]]:
    rng = random.Random(seed)
    per_user = {}
    rows = []
    for u in range(n_users):
        k = 1 + int(rng.paretovariate(1.0)) % 30
        per_user[str(u * 7)] = [f"{rng.choice(TEXTS)} #{u}.{i}" for i in range(k)]
        rows += [(u * 7, t) for t in per_user[str(u * 7)]]
    # interleave users but keep each user's own order (the store keeps file order)
    order = sorted(range(len(rows)), key=lambda i: (rng.random(), 0))
    by_user_pos: dict[int, int] = {}
    out = []
    for i in order:
        u = rows[i][0]
        j = by_user_pos.get(u, 0)
        by_user_pos[u] = j + 1
        out.append((u, per_user[str(u)][j]))
    return out, per_user


def _write(path: Path, rows, user_col="user_id", text_col="text") -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({user_col: u, text_col: t, "other": 1}) + "\n" for u, t in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([user_col, "other", text_col])
            w.writerows([(u, 1, t) for u, t in rows])
    else:
        pq.write_table(pa.table({user_col: [u for u, _ in rows], text_col: [t for _, t in rows]}), path)
    return path


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_file_store_reads_back_every_user(tmp_path, ext, monkeypatch):
    monkeypatch.setattr(files_mod, "BATCH_ROWS", 16)  # several batches in both passes
    rows, per_user = _rows()
    path = _write(tmp_path / f"data.{ext}", rows)
    s = FileUserStore(path, test_fraction=0.25, min_examples=3, cache_dir=tmp_path / "cache")
    kept = {u: ex for u, ex in per_user.items() if len(ex) >= 3}
    assert s.num_users == len(kept)
    assert [s.user_name(i) for i in range(s.num_users)] == sorted(kept, key=int)  # numeric id order
    for i in range(s.num_users):
        ex = kept[s.user_name(i)]
        k = split_test_count(len(ex), 0.25)
        assert s.train_examples(i) == ex[: len(ex) - k]
        assert s.test_examples(i) == ex[len(ex) - k:]
        assert s.num_examples(i) == len(ex)
    assert s.stats["users_dropped"] == len(per_user) - len(kept)
    assert s.stats["rows_dropped"] == sum(len(v) for v in per_user.values() if len(v) < 3)
    assert s.stats["rows_read"] == len(rows)


def test_file_store_index_is_cached(tmp_path):
    rows, _ = _rows(20)
    path = _write(tmp_path / "data.parquet", rows)
    cache = tmp_path / "cache"
    builds = FileUserStore.builds
    s1 = FileUserStore(path, cache_dir=cache)
    assert s1.built and FileUserStore.builds == builds + 1
    files = sorted(p for p in s1.index_dir.iterdir())
    assert [p.name for p in files] == ["examples.arrow", "meta.json", "offsets.npy", "users.arrow"]
    mtimes = [p.stat().st_mtime_ns for p in files]
    s2 = FileUserStore(path, cache_dir=cache)
    assert not s2.built and FileUserStore.builds == builds + 1
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert [s2.train_examples(u) for u in range(s2.num_users)] == [s1.train_examples(u) for u in range(s1.num_users)]
    left = [p.name for p in cache.joinpath("files").iterdir() if not p.name.endswith(".lock")]
    assert left == [s1.index_dir.name]  # no temporary directory left
    # a changed file gets a new index; a damaged index is rebuilt, never trusted
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert FileUserStore(path, cache_dir=cache).built
    s4 = FileUserStore(path, cache_dir=cache)
    (s4.index_dir / "meta.json").unlink()
    assert FileUserStore(path, cache_dir=cache).built


def test_file_store_default_cache_dir_and_build_store(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "c"))
    rows, per_user = _rows(10)
    path = _write(tmp_path / "d.jsonl", rows, user_col="author", text_col="body")
    cfg = DataConfig(source="files", path=str(path), user_column="author", text_column="body", min_examples=1,
                     max_users=4)
    s = build_store(cfg)
    assert isinstance(s, FileUserStore) and s.num_users == 4
    assert s.index_dir.parent == tmp_path / "c" / "files"
    assert s.train_examples(0) + s.test_examples(0) == per_user[s.user_name(0)]


def test_file_store_skips_empty_texts_and_truncates_on_request(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"user_id": "a", "text": "x"}\n{"user_id": "a", "text": ""}\n\n'
                    '{"user_id": "a", "text": null}\n{"user_id": "b", "text": "%s"}\n' % ("é" * 40))
    s = FileUserStore(path, test_fraction=0.01, cache_dir=tmp_path / "c", max_example_bytes=25,
                      long_examples="truncate")
    assert s.stats["empty_texts_skipped"] == 2 and s.stats["truncated"] == 1
    assert s.train_examples(0) == ["x"] and s.train_examples(1) == ["é" * 12]  # cut on a character boundary
    with pytest.raises(DataError, match=r"d\.jsonl: line 5: the text is 80 bytes, over max_example_bytes=25"):
        FileUserStore(path, cache_dir=tmp_path / "c", max_example_bytes=25)


PARQUET_NO_USER = "parquet-no-user"
PARQUET_BAD_UTF8 = "parquet-bad-utf8"


@pytest.mark.parametrize("name, content, pattern", [
    ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
    ("empty.csv", b"", r"empty\.csv: the file is empty"),
    ("header.csv", b"user_id,text\n", r"header\.csv: no rows"),
    ("nouser.jsonl", b'{"author": 1, "text": "a"}\n', r"nouser\.jsonl: line 1: no user column 'user_id'"),
    ("notext.jsonl", b'{"user_id": 1, "body": "a"}\n', r"notext\.jsonl: line 1: no text column 'text'"),
    ("nouser.csv", b"author,text\n1,a\n", r"nouser\.csv: no user column 'user_id' \(columns: author, text\)"),
    ("malformed.jsonl", b'{"user_id": 1, "text": "a"}\n\n{"user_id": 2, "text": "b"\n{"user_id": 3, "text": "c"}\n',
     r"malformed\.jsonl: line 3: malformed JSON"),
    ("badutf8.jsonl", b'{"user_id": 1, "text": "a"}\n{"user_id": 2, "text": "b\xff"}\n',
     r"badutf8\.jsonl: line 2: not valid UTF-8"),
    ("badutf8.csv", b"user_id,text\n1,a\n2,ok\n3,b\xffc\n", r"badutf8\.csv: row 3: the text is not valid UTF-8"),
    ("nulluser.jsonl", b'{"user_id": 1, "text": "a"}\n{"user_id": null, "text": "b"}\n',
     r"nulluser\.jsonl: line 2: the user id \('user_id'\) is missing or null"),
    ("emptyuser.csv", b"user_id,text\n1,a\n,b\n", r"emptyuser\.csv: row 2: the user id \('user_id'\) is empty"),
    ("columns.csv", b"user_id,text\n1,a\n2,b,c\n", r"columns\.csv: row 2: expected 2 columns, got 3"),
    ("notobject.jsonl", b'{"user_id": 1, "text": "a"}\n[1, 2]\n', r"notobject\.jsonl: line 2: expected a JSON object"),
    ("alltextempty.csv", b'user_id,text\n1,""\n2,\n', r"alltextempty\.csv: no examples: all 2 rows"),
    ("garbage.parquet", b"not parquet at all", r"garbage\.parquet: not a readable Parquet file"),
    ("data.txt", b"x", r"data\.txt: unknown file type"),
    (PARQUET_NO_USER, None, r"nouser\.parquet: no user column 'user_id'"),
    (PARQUET_BAD_UTF8, None, r"badutf8\.parquet: row 2: the text is not valid UTF-8"),
])
def test_bad_files_raise_data_error_naming_file_and_place(tmp_path, name, content, pattern):
    if name == PARQUET_NO_USER:
        path = tmp_path / "nouser.parquet"
        pq.write_table(pa.table({"author": [1], "text": ["a"]}), path)
    elif name == PARQUET_BAD_UTF8:
        path = tmp_path / "badutf8.parquet"
        pq.write_table(pa.table({"user_id": [1, 2], "text": pa.array([b"ok", b"\xffno"], pa.binary())}), path)
    else:
        path = tmp_path / name
        path.write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        FileUserStore(path, cache_dir=tmp_path / "c")
    assert not list(tmp_path.glob("c/files/.*tmp*"))  # a failed build leaves no temporary directory


def test_users_below_min_examples_are_dropped_or_refused(tmp_path):
    path = tmp_path / "few.csv"
    path.write_text("user_id,text\n1,a\n1,b\n2,c\n")
    s = FileUserStore(path, min_examples=2, cache_dir=tmp_path / "c")
    assert s.num_users == 1 and s.stats["users_dropped"] == 1 and s.stats["rows_dropped"] == 1
    with pytest.raises(DataError, match=r"few\.csv: no user has at least min_examples=3"):
        FileUserStore(path, min_examples=3, cache_dir=tmp_path / "c")


def test_generated_stackoverflow_like_file_round_trips(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.make_stackoverflow_like import main as make

    out = tmp_path / "so.parquet"
    make(["--users", "300", "--out", str(out), "--jsonl", "--chunk-users", "100"])
    a = FileUserStore(out, cache_dir=tmp_path / "c")
    b = FileUserStore(out.with_suffix(".jsonl"), cache_dir=tmp_path / "c")
    assert a.num_users == b.num_users == 300
    for u in (0, 150, 299):
        assert a.user_name(u) == b.user_name(u) == str(u)
        assert a.train_examples(u) == b.train_examples(u) and a.test_examples(u) == b.test_examples(u)


# ---- memory vs population (slow) -----------------------------------------------------
@pytest.mark.slow
def test_memory_is_flat_in_population():
    sys.path.insert(0, str(ROOT))
    from bench.memory_population import run_child

    common = ["--cohort", "100", "--rounds", "5", "--seed", "0"]
    small = run_child(["--child", "synthetic", "--users", "1000", *common])
    large = run_child(["--child", "synthetic", "--users", "100000", *common])
    assert large["delta_mb"] < 50 and small["delta_mb"] < 50
    assert abs(large["peak_rss_mb"] - small["peak_rss_mb"]) < 30
    assert large["examples_read"] > 0
