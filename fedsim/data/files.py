"""Users from a local JSONL / CSV / Parquet file: one row = one example (user id, text).

The file is read once, in streaming batches, into a **user index** cached under ``$FEDSIM_CACHE_DIR/files/<key>/``
(default ``~/.cache/fedsim/files/<key>/``), where the key hashes the file's absolute path, size and mtime and
the options that change the index (columns, min_examples, byte limit). The cache holds:

- ``examples.arrow``: an Arrow IPC file with one ``text`` column, rows sorted by user (stable: a user's
  examples keep their file order), opened memory-mapped;
- ``offsets.npy``: int64, user u's rows are ``offsets[u]:offsets[u+1]`` (memory-mapped);
- ``users.arrow``: the user ids (strings), user u's id at row u;
- ``meta.json``: counts (rows read, empty texts skipped, users dropped, ...), written last.

A build writes into a temporary directory and renames it into place (atomic: a reader never sees half an
index; two concurrent builds leave one). Opening a cached index maps files and reads nothing else, so
``train_examples(u)`` touches only u's rows: host memory grows with the users read, not with the file.

Users are numbered in sorted order of their ids (numerically when every id is an integer, else by UTF-8
bytes). User ids are read as strings (CSV) or converted to strings (JSON / Parquet integers). The held-out
split is the last ``split_test_count(n, test_fraction)`` examples of each user.

Bad input raises `DataError` naming the file and the place (1-based): ``line N`` for JSONL (physical line),
``row N`` for CSV (data rows, header not counted) and Parquet.
- missing user / text column, empty file, a file with no rows: error;
- malformed JSON line, a line that is not an object, a user id that is null: error;
- text that is not valid UTF-8: error (row / line);
- null or empty text: the row is **skipped** and counted (``stats["empty_texts_skipped"]``);
- a text longer than ``max_example_bytes`` (default 1 MiB): error by default, or ``long_examples="truncate"``
  cuts it at the limit (on a UTF-8 character boundary), counted in ``stats["truncated"]``;
- users with fewer than ``min_examples`` examples are dropped, counted in ``stats["users_dropped"]`` /
  ``stats["rows_dropped"]``; no user left: error.

The format is chosen by the file name's suffix (`FORMATS`). `data_report()` gives these counts (and the users
beyond ``max_users``, applied after the index is built) for the console's ``note:`` lines and summary.json.
``public_path``: an optional second file whose text column is public pre-training data (`read_public_texts`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedsim.data.base import UserStore
from fedsim.data.synthetic import split_test_count, split_test_counts
from fedsim.errors import DataError
from fedsim.rundir import cache_dir as fedsim_cache_dir

log = logging.getLogger("fedsim.data")

INDEX_VERSION = 1
BATCH_ROWS = 65_536  # rows per streamed batch (and per record batch of the sorted file)
RELEASE_EVERY = 8  # user reads between dropping the mapped example pages from RSS
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
_SCHEMA = pa.schema([("user", pa.string()), ("text", pa.string())])


@dataclass
class _Batch:
    """One streamed batch: user ids and texts, where its rows are in the file."""

    user: pa.Array
    text: pa.Array
    first_row: int  # 0-based index of the batch's first data row in the file
    lines: np.ndarray | None = None  # JSONL: physical line number (1-based) of each row

    def where(self, i: int) -> str:
        return f"line {int(self.lines[i])}" if self.lines is not None else f"row {self.first_row + i + 1}"


class _NeedLineReader(Exception):
    """The fast JSONL reader hit something it cannot place on a line: re-read in Python."""


class FileUserStore(UserStore):
    """Users of a JSONL / CSV / Parquet file, indexed once and read memory-mapped. ``builds`` counts index
    builds in this process (a cached open does not build); ``built`` says whether this instance built its
    index; ``stats`` has the counts."""

    builds = 0

    def __init__(self, path: str | os.PathLike, user_column: str = "user_id", text_column: str = "text",
                 test_fraction: float = 0.2, min_examples: int = 1, *, max_users: int | None = None,
                 max_example_bytes: int = 1 << 20, long_examples: str = "error",
                 cache_dir: str | os.PathLike | None = None, file_format: str | None = None,
                 public_path: str | os.PathLike | None = None):
        self.path = Path(path)
        self.format = check_data_file(self.path, "data.path", file_format)
        if long_examples not in ("error", "truncate"):
            raise ValueError(f"long_examples must be 'error' or 'truncate', got {long_examples!r}")
        if not 0 <= test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.user_column, self.text_column, self.long_examples = user_column, text_column, long_examples
        self.test_fraction, self.min_examples = float(test_fraction), max(1, int(min_examples))
        self.max_example_bytes = int(max_example_bytes)
        self.max_users = None if max_users is None else int(max_users)
        self.public_path = None if public_path is None else Path(public_path)
        if self.public_path is not None:
            check_data_file(self.public_path, "data.public_path")
        self._public: tuple[list[str], dict] | None = None
        st = self.path.stat()
        if st.st_size == 0:
            raise DataError(f"{self.path}: the file is empty")
        key = {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "format": self.format, "user": user_column, "text": text_column, "min": self.min_examples,
               "max_bytes": self.max_example_bytes, "long": long_examples, "v": INDEX_VERSION}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.index_dir = Path(cache_dir) / "files" / digest if cache_dir else fedsim_cache_dir("files", digest)
        self.built = False
        if not self._load_meta():
            self.built = self._build()
            FileUserStore.builds += int(self.built)
            if not self._load_meta():
                raise DataError(f"{self.path}: could not read back the index built in {self.index_dir}")
        self._offsets = np.load(self.index_dir / "offsets.npy", mmap_mode="r")
        self._examples_map = _MappedIPC(self.index_dir / "examples.arrow")
        self._examples = self._examples_map.table.column("text")
        self._names = _MappedIPC(self.index_dir / "users.arrow").table.column("user")
        self._reads = 0
        n = len(self._offsets) - 1
        self._n = n if max_users is None else min(n, int(max_users))

    def _load_meta(self) -> bool:
        try:
            meta = json.loads((self.index_dir / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("version") != INDEX_VERSION:  # missing, incomplete, corrupt or stale: never trusted, rebuilt
            shutil.rmtree(self.index_dir, ignore_errors=True)
            return False
        self.stats = meta
        return True

    def _build(self) -> bool:
        root = self.index_dir.parent
        root.mkdir(parents=True, exist_ok=True)
        with _build_lock(root / f".{self.index_dir.name}.lock"):
            if self._load_meta():  # another process built it while we waited
                return False
            t0 = time.perf_counter()
            tmp = root / f".{self.index_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                unsorted = tmp / "unsorted.arrow"
                try:
                    counts = self._pass1(unsorted, fast=True)
                except _NeedLineReader:
                    counts = self._pass1(unsorted, fast=False)
                stats = self._pass2(unsorted, tmp, counts)
                unsorted.unlink()
                stats["build_seconds"] = round(time.perf_counter() - t0, 3)
                (tmp / "meta.json").write_text(json.dumps(stats, indent=1))
                try:
                    os.rename(tmp, self.index_dir)
                except OSError:
                    if not (self.index_dir / "meta.json").is_file():  # not a concurrent winner: a real failure
                        raise
                log.info("%s: indexed %d users, %d examples in %.1fs (%d empty texts skipped, %d users dropped "
                         "below min_examples=%d)", self.path, stats["users"], stats["examples"],
                         stats["build_seconds"], stats["empty_texts_skipped"], stats["users_dropped"],
                         self.min_examples)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                pa.default_memory_pool().release_unused()  # give the build's buffers back to the OS
        return True

    # ---- pass 1: stream, validate, write (user, text) unsorted -------------------------
    def _pass1(self, out: Path, fast: bool) -> dict:
        if self.format == "jsonl":
            batches = self._jsonl_arrow_batches() if fast else self._jsonl_python_batches()
        else:
            batches = self._parquet_batches() if self.format == "parquet" else self._csv_batches()
        counts = {"rows_read": 0, "empty_texts_skipped": 0, "truncated": 0}
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
            for b in batches:
                counts["rows_read"] += len(b.user)
                user, text = self._validate(b, counts)
                if len(user):
                    writer.write_batch(pa.record_batch([user, text], schema=_SCHEMA))
        if counts["rows_read"] == 0:
            raise DataError(f"{self.path}: no rows (the file has no data)")
        return counts

    def _fail(self, b: _Batch, i: int, what: str):
        if b.lines is None and self.format == "jsonl":
            raise _NeedLineReader()
        raise DataError(f"{self.path}: {b.where(i)}: {what}")

    def _too_long(self, nbytes: int) -> str:
        return (f"the text is {nbytes} bytes, over max_example_bytes={self.max_example_bytes} "
                f"(raise data.max_example_bytes or set data.long_examples=truncate)")

    def _validate(self, b: _Batch, counts: dict) -> tuple[pa.Array, pa.Array]:
        user, text = b.user, b.text
        if user.null_count:
            self._fail(b, _first_true(pc.is_null(user)), f"the user id ({self.user_column!r}) is missing or null")
        if not pa.types.is_string(user.type):
            try:
                user = user.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                self._fail(b, 0, f"user ids of type {user.type} cannot be read as strings")
        empty = pc.equal(pc.binary_length(user), 0)
        if pc.any(empty).as_py():
            self._fail(b, _first_true(empty), f"the user id ({self.user_column!r}) is empty")
        if pa.types.is_null(text.type):
            text = pa.nulls(len(text), pa.string())
        elif text.type not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
            self._fail(b, 0, f"the text column ({self.text_column!r}) has type {text.type}, not text")
        else:
            raw = text.cast(pa.binary())  # zero copy for (non-large) strings
            try:
                text = raw.cast(pa.string())  # checks UTF-8
            except pa.ArrowInvalid:
                self._fail(b, _first_bad_utf8(raw), "the text is not valid UTF-8")
        lengths = pc.binary_length(text)
        keep = pc.fill_null(pc.greater(lengths, 0), False)
        n_keep = pc.sum(keep).as_py() or 0
        rows = None  # the kept rows' places in the batch, when some were skipped
        if n_keep < len(text):
            counts["empty_texts_skipped"] += len(text) - n_keep
            user, text, lengths = user.filter(keep), text.filter(keep), lengths.filter(keep)
            rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        if len(text) and pc.max(lengths).as_py() > self.max_example_bytes:
            over = np.flatnonzero(lengths.to_numpy() > self.max_example_bytes)
            if self.long_examples == "error":
                i = int(over[0])
                self._fail(b, int(rows[i]) if rows is not None else i, self._too_long(lengths[i].as_py()))
            values = text.to_pylist()
            for i in over.tolist():
                values[i] = values[i].encode("utf-8")[: self.max_example_bytes].decode("utf-8", "ignore")
            text = pa.array(values, pa.string())
            counts["truncated"] += int(over.size)
        return user, text

    def _missing(self, names: list[str], where: str = "", noun: str = "columns") -> None:
        for col, what in ((self.user_column, "user"), (self.text_column, "text")):
            if col not in names:
                raise DataError(f"{self.path}: {where}no {what} column {col!r} "
                                f"({noun}: {', '.join(map(str, names))}); set data.{what}_column")

    def _parquet_batches(self) -> Iterator[_Batch]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(str(self.path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{self.path}: not a readable Parquet file ({exc})") from None
        self._missing(pf.schema_arrow.names)
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=[self.user_column, self.text_column])
        yield from self._batches_of(batches.__next__, lambda exc, row: DataError(
            f"{self.path}: unreadable Parquet data after row {row} ({exc})"), (pa.ArrowInvalid, OSError))

    def _csv_batches(self) -> Iterator[_Batch]:
        import pyarrow.csv as pcsv

        bad = []  # rows the invalid-row handler saw (kept for the message; the read then fails)
        block = max(1 << 24, 2 * self.max_example_bytes + 65_536)
        try:
            reader = pcsv.open_csv(
                str(self.path), read_options=pcsv.ReadOptions(use_threads=False, block_size=block),
                parse_options=pcsv.ParseOptions(newlines_in_values=True,
                                                invalid_row_handler=lambda r: bad.append(r) or "error"),
                convert_options=pcsv.ConvertOptions(
                    column_types={self.user_column: pa.string(), self.text_column: pa.binary()},
                    include_columns=[self.user_column, self.text_column], strings_can_be_null=False,
                    quoted_strings_can_be_null=False))
        except pa.ArrowKeyError:
            with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
                self._missing(next(csv.reader(f), []))
            raise
        except pa.ArrowInvalid as exc:
            raise self._csv_error(exc, bad, 0) from None
        yield from self._batches_of(reader.read_next_batch, lambda exc, row: self._csv_error(exc, bad, row))

    def _batches_of(self, next_batch: Callable[[], pa.RecordBatch], error: Callable[[Exception, int], Exception],
                    errors: tuple = (pa.ArrowInvalid,)) -> Iterator[_Batch]:
        """The record batches of `next_batch()` as `_Batch`es; a read error in `errors` (after `row` rows)
        becomes `error(exc, row)`, and so does a batch without the user or text column."""
        row = 0
        while True:
            try:
                rb = next_batch()
            except StopIteration:
                return
            except errors as exc:
                raise error(exc, row) from None
            if self.user_column not in rb.schema.names or self.text_column not in rb.schema.names:
                raise error(KeyError(self.user_column), row)
            yield _Batch(rb.column(self.user_column), rb.column(self.text_column), row)
            row += rb.num_rows

    def _csv_error(self, exc: Exception, bad: list, row: int) -> DataError:
        if bad:  # the invalid-row handler saw the row: its number counts the header as row 1
            r = bad[0]
            where = f"row {r.number - 1}" if r.number and r.number > 1 else f"after row {row}"
            return DataError(f"{self.path}: {where}: expected {r.expected_columns} columns, got "
                             f"{r.actual_columns}: {r.text[:80]!r}")
        what = "not a readable CSV file" if row == 0 else f"CSV error after row {row}"
        return DataError(f"{self.path}: {what} ({exc})")

    def _jsonl_arrow_batches(self) -> Iterator[_Batch]:
        """Arrow's JSON reader (fast). Anything it cannot read, or cannot place on a line
        (it skips blank lines), sends the build to the line-by-line reader."""
        import pyarrow.json as pj

        block = max(1 << 24, 2 * self.max_example_bytes + 65_536)
        try:
            reader = pj.open_json(str(self.path), read_options=pj.ReadOptions(use_threads=False, block_size=block))
            yield from self._batches_of(reader.read_next_batch, lambda exc, row: _NeedLineReader())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeDecodeError, ValueError):
            raise _NeedLineReader() from None

    def _jsonl_python_batches(self) -> Iterator[_Batch]:
        """Line by line with `json`: slower, exact line numbers in every error."""
        with open(self.path, "rb") as f:
            rows = ((lineno, *self._json_row(raw, lineno)) for lineno, raw in enumerate(f, 1) if raw.strip())
            first_row = 0
            while chunk := list(itertools.islice(rows, BATCH_ROWS)):
                lines, users, texts = zip(*chunk)
                yield _Batch(pa.array(users, pa.string()), pa.array(texts, pa.string()), first_row,
                             np.asarray(lines, dtype=np.int64))
                first_row += len(chunk)

    def _json_row(self, raw: bytes, lineno: int) -> tuple[str | None, str | None]:
        """(user id, text) of one JSON line; a long text fails here, before its batch is held in memory."""
        where = f"line {lineno}: "
        try:
            obj = json.loads(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: {where}not valid UTF-8 (byte {exc.start} of the line)") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.path}: {where}malformed JSON ({exc.msg} at column {exc.colno}); "
                            f"expected JSON Lines, one object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{self.path}: {where}expected a JSON object, got {type(obj).__name__}")
        self._missing(list(obj), where, "fields")
        u, t = obj[self.user_column], obj[self.text_column]
        if isinstance(u, (dict, list)):
            raise DataError(f"{self.path}: {where}the user id is a JSON {type(u).__name__}, not a string or number")
        if t is not None:
            if not isinstance(t, str):
                raise DataError(f"{self.path}: {where}the text is a JSON {type(t).__name__}, not a string")
            try:
                nbytes = len(t.encode("utf-8"))
            except UnicodeEncodeError:
                raise DataError(f"{self.path}: {where}the text is not valid UTF-8 (a lone surrogate escape)") from None
            if nbytes > self.max_example_bytes and self.long_examples == "error":
                raise DataError(f"{self.path}: {where}{self._too_long(nbytes)}")
        return None if u is None else str(u), t

    # ---- pass 2: number users, drop small ones, write rows sorted by user -------------
    def _pass2(self, unsorted: Path, tmp: Path, counts: dict) -> dict:
        mapped = _MappedIPC(unsorted)
        batches = mapped.batches
        if not batches:
            raise DataError(f"{self.path}: no examples: all {counts['rows_read']} rows have an empty or null text")
        users = pa.chunked_array([b.column(0) for b in batches], pa.string())
        uniq = _sorted_ids(pc.unique(users))
        codes = pc.index_in(users, value_set=uniq).to_numpy().astype(np.int64)
        del users
        mapped.release()
        per_user = np.bincount(codes, minlength=len(uniq))
        keep = per_user >= self.min_examples
        if not keep.any():
            raise DataError(f"{self.path}: no user has at least min_examples={self.min_examples} examples "
                            f"({len(uniq)} users, at most {int(per_user.max())} examples each); "
                            f"lower data.min_examples")
        rows = np.argsort(codes, kind="stable")
        if not keep.all():
            rows = rows[keep[codes[rows]]]
        del codes
        offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(per_user[keep], out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        with pa.OSFile(str(tmp / "users.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, pa.schema([("user", pa.string())])) as w:
            w.write_table(pa.table({"user": uniq.filter(pa.array(keep))}), max_chunksize=1 << 20)
        starts = np.zeros(len(batches) + 1, dtype=np.int64)
        np.cumsum([b.num_rows for b in batches], out=starts[1:])
        texts = [b.column(1) for b in batches]
        schema = pa.schema([("text", pa.string())])
        with pa.OSFile(str(tmp / "examples.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for s in range(0, len(rows), BATCH_ROWS):
                w.write_batch(pa.record_batch([_take_rows(texts, starts, rows[s:s + BATCH_ROWS])], schema=schema))
                mapped.release()
        del texts, batches
        mapped.close()
        return {"version": INDEX_VERSION, "file": str(self.path), "format": self.format,
                "user_column": self.user_column, "text_column": self.text_column, **counts,
                "users": int(keep.sum()), "examples": int(offsets[-1]), "users_dropped": int((~keep).sum()),
                "rows_dropped": int(per_user[~keep].sum()), "min_examples": self.min_examples,
                "max_example_bytes": self.max_example_bytes, "long_examples": self.long_examples}

    @property
    def num_users(self) -> int:
        return self._n

    def num_examples(self, user: int) -> int:
        u = self._check_user(user)
        return int(self._offsets[u + 1] - self._offsets[u])

    def example_counts(self) -> np.ndarray:
        return np.diff(np.asarray(self._offsets[: self._n + 1]))

    def train_example_counts(self) -> np.ndarray:
        n = self.example_counts()
        return n - split_test_counts(n, self.test_fraction)

    def _read(self, user: int, held_out: bool) -> list[str]:
        u = self._check_user(user)
        a, b = int(self._offsets[u]), int(self._offsets[u + 1])
        m = b - split_test_count(b - a, self.test_fraction)
        start, stop = (m, b) if held_out else (a, m)
        if stop <= start:
            return []
        out = self._examples.slice(start, stop - start).to_pylist()  # copies into Python strings
        self._reads += 1
        if self._reads % RELEASE_EVERY == 0:
            self._examples_map.release()
        return out

    def train_examples(self, user: int) -> list[str]:
        return self._read(user, held_out=False)

    def test_examples(self, user: int) -> list[str]:
        return self._read(user, held_out=True)

    def user_name(self, user: int) -> str:
        return self._names[self._check_user(user)].as_py()

    def public_examples(self) -> list[str]:
        """The texts of `public_path` (read once, on first use), or [] without one."""
        if self.public_path is None:
            return []
        if self._public is None:
            self._public = read_public_texts(self.public_path, self.text_column, self.max_example_bytes,
                                             self.long_examples)
        return self._public[0]

    def data_report(self) -> dict:
        st, n_all = self.stats, len(self._offsets) - 1
        beyond = int(self._offsets[n_all] - self._offsets[self._n])
        out = {"source": "files", "path": str(self.path), "rows_read": st["rows_read"],
               "empty_texts_skipped": st["empty_texts_skipped"], "texts_truncated": st["truncated"],
               "max_example_bytes": self.max_example_bytes, "long_examples": self.long_examples,
               "users_below_min_examples": st["users_dropped"], "examples_below_min_examples": st["rows_dropped"],
               "min_examples": self.min_examples, "users_beyond_max_users": n_all - self._n,
               "examples_beyond_max_users": beyond, "max_users": self.max_users,
               "users": self._n, "examples": int(self._offsets[self._n])}
        if self.public_path is not None:
            self.public_examples()
            out["public"] = {"path": str(self.public_path), **self._public[1]}
        return out


def check_data_file(path: Path, key: str, file_format: str | None = None) -> str:
    """The format of a data file named by config key `key`, by its suffix (`FORMATS`) unless `file_format`
    is given; a missing file, a directory or an unknown suffix is a `DataError` saying so."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file ({key} takes one JSONL / CSV / Parquet file)")
    if not path.is_file():
        raise DataError(f"{path}: no such file ({key})")
    fmt = file_format or FORMATS.get(path.suffix.lower())
    if fmt not in ("jsonl", "csv", "parquet"):
        raise DataError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}: the format is chosen by the"
                        " file name's suffix: .jsonl, .ndjson or .json (JSON Lines: one object per line), .csv,"
                        f" .parquet or .pq; rename the file ({key})")
    return fmt


def read_public_texts(path: Path, text_column: str = "text", max_example_bytes: int = 1 << 20,
                      long_examples: str = "error") -> tuple[list[str], dict]:
    """(texts, counts) of a public file's `text_column`, in file order, whole in memory (pre-training samples
    batches from a list): an empty or null text is skipped, a longer one than `max_example_bytes` refused or
    truncated (`long_examples`), as for the users' file. Counts: public_texts, empty_texts_skipped, truncated."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fmt, where = check_data_file(path, "data.public_path"), f"{path} (data.public_path)"
    try:
        if fmt == "parquet":
            values = pq.read_table(str(path), columns=[text_column]).column(text_column).to_pylist()
        elif fmt == "csv":
            values = pcsv.read_csv(str(path), convert_options=pcsv.ConvertOptions(
                include_columns=[text_column], column_types={text_column: pa.string()})).column(text_column).to_pylist()
        else:
            values = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as exc:
                        raise DataError(f"{where}: line {lineno}: malformed JSON ({exc})") from None
                    if not isinstance(obj, dict) or text_column not in obj:
                        raise DataError(f"{where}: line {lineno}: no text field {text_column!r}"
                                        " (data.text_column names it)")
                    values.append(obj[text_column])
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise DataError(f"{where}: cannot read the text column {text_column!r} (data.text_column):"
                        f" {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    texts, counts = [], {"public_texts": 0, "empty_texts_skipped": 0, "texts_truncated": 0}
    for i, t in enumerate(values, 1):
        if t is not None and not isinstance(t, str):
            raise DataError(f"{where}: text {i} is a {type(t).__name__}, not a string")
        if not t:
            counts["empty_texts_skipped"] += 1
            continue
        raw = t.encode("utf-8", "surrogatepass")
        if len(raw) > max_example_bytes:
            if long_examples == "error":
                raise DataError(f"{where}: text {i} is {len(raw)} bytes, over max_example_bytes={max_example_bytes}"
                                " (raise data.max_example_bytes or set data.long_examples=truncate)")
            t, counts["texts_truncated"] = raw[:max_example_bytes].decode("utf-8", "ignore"), counts["texts_truncated"] + 1
        texts.append(t)
    if not texts:
        raise DataError(f"{where}: no public texts (every {text_column!r} is empty)")
    counts["public_texts"] = len(texts)
    return texts, counts


class _MappedIPC:
    """An Arrow IPC file mapped read-only (zero copy), whose touched pages can be dropped from this process's
    RSS: `release()` (madvise DONTNEED on a shared read-only file mapping) unmaps them; the data stays in the
    page cache and is faulted back on the next read. Without it, RSS would grow towards the file size as
    users are read (on this kernel a fault maps a whole page-cache folio, ~1 MB per user read)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._mm)))
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.table = pa.Table.from_batches(self.batches, reader.schema)

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.batches = self.table = None
        with contextlib.suppress(BufferError):  # arrays still point into the mapping: leave it to the GC
            self._mm.close()


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock file around a build, so concurrent workers build an index once.
    Closing the file releases the lock; the empty lock file stays (harmless)."""
    with open(path, "a+") as f:
        with contextlib.suppress(ImportError):  # no flock (Windows): the atomic rename still keeps the cache whole
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _first_true(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _first_bad_utf8(values: pa.Array) -> int:
    for i, v in enumerate(values.to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return 0


def _sorted_ids(uniq: pa.Array) -> pa.Array:
    """The distinct user ids, sorted numerically when all are integers, else bytewise."""
    with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
        as_int = uniq.cast(pa.int64())
        if pc.all(pc.equal(as_int.cast(pa.string()), uniq)).as_py():  # "007" stays a string id
            return uniq.take(pc.sort_indices(as_int))
    return uniq.take(pc.sort_indices(uniq))


def _take_rows(chunks: list[pa.Array], starts: np.ndarray, rows: np.ndarray) -> pa.Array:
    """Rows (global indices) of a list of arrays, in the given order, touching only the
    chunks that hold them (a ChunkedArray.take would concatenate every chunk first)."""
    which = np.searchsorted(starts, rows, side="right") - 1
    perm = np.argsort(which, kind="stable")
    pieces = []
    for seg in np.split(perm, np.flatnonzero(np.diff(which[perm])) + 1):
        c = int(which[seg[0]])
        pieces.append(chunks[c].take(pa.array(rows[seg] - starts[c])))
    return pa.concat_arrays(pieces).take(pa.array(np.argsort(perm)))  # back to the given order
