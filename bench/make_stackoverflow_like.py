"""Write a StackOverflow-shaped file of (user_id, text) rows for the file store.

    python bench/make_stackoverflow_like.py                      # 342,477 users, Parquet
    python bench/make_stackoverflow_like.py --users 2000 --jsonl --csv --out /tmp/so.parquet

Shape (TFF's StackOverflow has 342,477 training users with heavy-tailed post counts):
- posts per user: discrete lognormal, ``max(1, round(exp(ln(median) + sigma * Z)))``
  capped at ``--max-posts``; defaults median 2, sigma 1.6 give a mean of ~7 posts and a
  tail into the thousands (~15 users above 1,000 posts out of 342,477);
- a post: lognormal word count (median 8 words), words drawn from a seeded Zipf
  distribution over a ``--vocab``-word pseudo-vocabulary (lowercase ASCII), joined by spaces;
- user ids are integers; rows are written in chunks of ``--chunk-users`` users with the
  rows of a chunk shuffled (users interleave, as in an export sorted by time, but only
  within a chunk: a full shuffle would need the whole file in memory).

Everything is generated with Arrow compute kernels, chunk by chunk (memory is one chunk).
The default output is ``$FEDSIM_CACHE_DIR/bench/stackoverflow_like.parquet`` (default
cache ``~/.cache/fedsim``), outside the repository. ``--jsonl`` / ``--csv`` also write the
same rows next to it. Prints one JSON object: users, rows, bytes, seconds, posts-per-user
quantiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def default_out() -> Path:
    root = os.environ.get("FEDSIM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedsim")
    return Path(root) / "bench" / "stackoverflow_like.parquet"


def make_vocab(rng: np.random.Generator, size: int) -> tuple[pa.Array, np.ndarray]:
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    p = 1.0 / np.arange(1, letters.size + 1) ** 0.9
    lengths = np.minimum(2 + rng.geometric(0.3, size=size), 14)
    chars = rng.choice(letters, size=int(lengths.sum()), p=p / p.sum())
    offsets = np.zeros(size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    vocab = pa.StringArray.from_buffers(size, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))
    weights = 1.0 / np.arange(1, size + 1) ** 1.07
    cdf = np.cumsum(weights[rng.permutation(size)])
    return vocab, cdf / cdf[-1]


def posts_per_user(rng: np.random.Generator, n: int, median: float, sigma: float, cap: int) -> np.ndarray:
    x = np.rint(np.exp(np.log(median) + sigma * rng.standard_normal(n)))
    return np.clip(x, 1, cap).astype(np.int64)


def make_chunk(rng, first_user: int, counts: np.ndarray, vocab: pa.Array, cdf: np.ndarray,
               words_median: float) -> pa.Table:
    users = np.repeat(np.arange(first_user, first_user + counts.size, dtype=np.int64), counts)
    rng.shuffle(users)  # interleave the chunk's users
    n_words = np.clip(np.rint(np.exp(np.log(words_median) + 0.6 * rng.standard_normal(users.size))), 1, 200)
    offsets = np.zeros(users.size + 1, dtype=np.int32)
    np.cumsum(n_words.astype(np.int32), out=offsets[1:])
    ids = np.minimum(np.searchsorted(cdf, rng.random(int(offsets[-1])), side="right"), len(vocab) - 1)
    words = pa.ListArray.from_arrays(pa.array(offsets), vocab.take(pa.array(ids)))
    text = pc.binary_join(words, " ")
    return pa.table({"user_id": pa.array(users), "text": text})


def jsonl_bytes(table: pa.Table) -> memoryview:
    """Rows as JSON lines, built with Arrow kernels (texts are plain ASCII words: no escaping)."""
    line = pc.binary_join_element_wise(
        '{"user_id": ', pc.cast(table["user_id"], pa.string()), ', "text": "', table["text"], '"}\n', "")
    line = line.combine_chunks() if isinstance(line, pa.ChunkedArray) else line
    offsets = np.frombuffer(line.buffers()[1], dtype=np.int32, count=len(line) + 1, offset=line.offset * 4)
    return memoryview(line.buffers()[2])[offsets[0]:offsets[-1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=342_477)
    ap.add_argument("--out", type=Path, default=None, help="Parquet path (default: the fedsim cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--median-posts", type=float, default=2.0)
    ap.add_argument("--sigma", type=float, default=1.6, help="lognormal sigma of posts per user")
    ap.add_argument("--max-posts", type=int, default=5000)
    ap.add_argument("--words-median", type=float, default=8.0)
    ap.add_argument("--vocab", type=int, default=20_000)
    ap.add_argument("--chunk-users", type=int, default=20_000)
    ap.add_argument("--jsonl", action="store_true", help="also write <out>.jsonl")
    ap.add_argument("--csv", action="store_true", help="also write <out>.csv")
    args = ap.parse_args(argv)
    if args.users < 1:
        ap.error("--users must be >= 1")

    t0 = time.perf_counter()
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    vocab, cdf = make_vocab(rng, args.vocab)
    counts = posts_per_user(rng, args.users, args.median_posts, args.sigma, args.max_posts)
    schema = pa.schema([("user_id", pa.int64()), ("text", pa.string())])
    tmp = {p: p.with_name(p.name + f".tmp-{os.getpid()}") for p in
           [out] + ([out.with_suffix(".jsonl")] if args.jsonl else []) + ([out.with_suffix(".csv")] if args.csv else [])}
    pw = pq.ParquetWriter(str(tmp[out]), schema, compression="zstd")
    jf = open(tmp[out.with_suffix(".jsonl")], "wb") if args.jsonl else None
    cw = None
    if args.csv:
        import pyarrow.csv as pcsv

        cw = pcsv.CSVWriter(str(tmp[out.with_suffix(".csv")]), schema)
    rows = text_bytes = 0
    for start in range(0, args.users, args.chunk_users):
        table = make_chunk(rng, start, counts[start:start + args.chunk_users], vocab, cdf, args.words_median)
        pw.write_table(table, row_group_size=1 << 20)
        if jf is not None:
            jf.write(jsonl_bytes(table))
        if cw is not None:
            cw.write_table(table)
        rows += table.num_rows
        text_bytes += int(pc.sum(pc.binary_length(table["text"])).as_py())
    pw.close()
    if jf is not None:
        jf.close()
    if cw is not None:
        cw.close()
    for final, t in tmp.items():
        os.replace(t, final)  # atomic: a half-written file never has the final name

    q = np.percentile(counts, [50, 90, 99, 99.9, 100])
    stats = {
        "path": str(out), "users": args.users, "rows": rows, "text_bytes": text_bytes,
        "bytes": {p.suffix.lstrip("."): p.stat().st_size for p in tmp},
        "posts_per_user": {"mean": round(float(counts.mean()), 3), "median": float(q[0]), "p90": float(q[1]),
                           "p99": float(q[2]), "p99.9": float(q[3]), "max": int(q[4]),
                           "users_with_1000_plus": int((counts >= 1000).sum())},
        "seed": args.seed, "seconds": round(time.perf_counter() - t0, 2),
    }
    json.dump(stats, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
