"""Large populations: per-user sizes are vectorised (no example is generated to plan
compute or print data stats), and a 10^5-user ULS run completes with memory flat in the
population (cheap in-process version here; `-m slow` runs configs/scale_1e5.yaml's shape)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedsim.plan import plan_compute, uls_user_compute, uls_users_compute
from fedsim.config import load_config
from fedsim.data.base import UserStore
from fedsim.data.synthetic import SyntheticTokenStore

ROOT = Path(__file__).resolve().parents[1]


class _Listed(UserStore):
    """A store with only the abstract methods: exercises the generic fallbacks."""

    def __init__(self, sizes):
        self.sizes = list(sizes)

    @property
    def num_users(self):
        return len(self.sizes)

    def train_examples(self, u):
        return ["x"] * self.sizes[self._check_user(u)]

    def test_examples(self, u):
        return ["y"] * (self.sizes[self._check_user(u)] % 3)


def test_vectorised_counts_match_the_per_user_answers():
    s = SyntheticTokenStore(3000, seed=5, min_examples=1, max_examples=40)
    train, total = s.train_example_counts(), s.example_counts()
    users = np.random.default_rng(0).choice(3000, 300, replace=False)
    for u in users.tolist():
        assert train[u] == len(s.train_examples(u))
        assert total[u] == len(s.train_examples(u)) + len(s.test_examples(u))
    g = _Listed([0, 1, 5, 9])
    assert g.train_example_counts().tolist() == [0, 1, 5, 9]
    assert g.example_counts().tolist() == [0, 2, 7, 9]


def test_shakespeare_counts_are_precomputed_and_equal_the_per_user_answers():
    from fedsim.data.shakespeare import ShakespeareStore

    s = ShakespeareStore()
    assert s.train_example_counts().tolist() == UserStore.train_example_counts(s).tolist()
    assert s.example_counts().tolist() == UserStore.example_counts(s).tolist()


def test_file_store_train_counts(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from fedsim.data.files import FileUserStore

    p = tmp_path / "d.jsonl"
    rows = [{"user_id": f"u{u}", "text": f"t{u}-{i}"} for u in range(30) for i in range(1 + u % 7)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    s = FileUserStore(str(p), min_examples=1)
    assert s.train_example_counts().tolist() == [len(s.train_examples(u)) for u in range(s.num_users)]


@pytest.mark.parametrize("ov", [[], ["uls.local_steps=3"], ["uls.local_steps=1", "uls.max_examples_per_user=5"],
                                ["uls.local_epochs=2", "uls.max_examples_per_user=4"],
                                ["uls.local_steps=7", "uls.batch_size=3"]])
def test_vectorised_user_compute_equals_the_scalar_rule(ov):
    uls = load_config(ROOT / "configs" / "smoke.yaml", ov).uls
    n = np.arange(0, 80)
    assert uls_users_compute(n, uls).tolist() == [uls_user_compute(int(x), uls) for x in n]


def test_plan_compute_at_1e6_users_generates_no_example(monkeypatch):
    cfg = load_config(ROOT / "configs" / "scale_1e5.yaml", ["data.num_users=1000000"])
    from fedsim.data import build_store

    store = build_store(cfg.data)

    def boom(*_):
        raise AssertionError("an example was generated")

    monkeypatch.setattr(store, "train_examples", boom)
    monkeypatch.setattr(store, "_generate", boom)
    t = time.perf_counter()
    cp = plan_compute(cfg, store)
    assert time.perf_counter() - t < 5.0
    counts = store.train_example_counts()
    expect = cfg.uls.expected_cohort / 1e6 * float(np.minimum(counts, cfg.uls.max_examples_per_user).sum())
    assert cp.uls_per_round == pytest.approx(expect)


def _tiny_run(tmp_path, users: int, name: str):
    from fedsim.loop import run_uls

    cfg = load_config(ROOT / "configs" / "scale_1e5.yaml", [
        f"run.output_dir={tmp_path}", f"run.name={name}", f"data.num_users={users}", "run.rounds=2",
        "uls.expected_cohort=20", "uls.users_per_client=10", "run.eval_examples=32", "simulation.backend=inprocess",
        "dp.reproducible=true",
        # RDP accounting: its memory is a fixed array of orders, while a PLD's grid depends on q
        # (20/10^3 vs 20/10^5), which would blur the population effect this test looks for
        "dp.accountant=rdp",
    ])
    from fedsim.privacy.accounting import _cached_pld

    _cached_pld.cache_clear()  # every run builds its own PLDs (the summary's PLD epsilon), as a fresh process would
    tracemalloc.start()
    try:
        _, summary = run_uls(cfg, say=lambda *_: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return summary, peak


@pytest.mark.slow  # ~70 s: a 10^5-user end-to-end run (README: `-m slow` runs the large populations)
def test_a_1e5_user_uls_run_completes_and_python_memory_does_not_grow_with_the_population(tmp_path):
    _tiny_run(tmp_path, 1000, "warm-up")  # one-time costs (imports, caches) are traced by whichever run is first
    small, peak_small = _tiny_run(tmp_path, 1000, "n1e3")
    big, peak_big = _tiny_run(tmp_path, 100_000, "n1e5")
    assert big["num_users"] == 100_000 and big["steps"] == 2 and big["stop_reason"] == "completed planned rounds"
    assert 0 < big["epsilon"] <= 8.0 and math.isfinite(big["eval_loss_after"])
    # traced Python + numpy allocations: a per-user structure at 10^5 users would cost >= 0.8 MB
    assert peak_big < peak_small + 2 * 2**20, (peak_small, peak_big)


def _peak_rss_of_run(tmp_path, users: int, rounds: int) -> tuple[float, dict]:
    code = (
        "import json, resource, sys; sys.path.insert(0, %r)\n"
        "from fedsim.config import load_config\nfrom fedsim.loop import run_uls\n"
        "cfg = load_config(%r, sys.argv[1:])\n"
        "_, s = run_uls(cfg, say=lambda *_: None)\n"
        "print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'summary': s}))\n"
    ) % (str(ROOT), str(ROOT / "configs" / "scale_1e5.yaml"))
    p = subprocess.run([sys.executable, "-c", code, f"run.output_dir={tmp_path}", f"run.name=n{users}",
                        f"data.num_users={users}", f"run.rounds={rounds}", "simulation.backend=inprocess"],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["peak_mb"], out["summary"]


@pytest.mark.slow
def test_scale_1e5_config_completes_with_flat_peak_rss(tmp_path):
    """configs/scale_1e5.yaml's shape (cohort 1000, cohort workers) in one process: peak RSS
    at 10^5 users within 64 MB of the same run at 10^3 users."""
    rss_small, _ = _peak_rss_of_run(tmp_path, 1000, 3)
    rss_big, s = _peak_rss_of_run(tmp_path, 100_000, 3)
    assert s["steps"] == 3 and s["num_users"] == 100_000 and 0 < s["epsilon"] <= 8.0
    assert rss_big < rss_small + 64, (rss_small, rss_big)


def test_els_kept_examples_at_1e6_users_do_no_per_user_python_work(monkeypatch):
    """The ELS plan at 10^6 synthetic users (~2.7M training examples): kept examples come from the
    vectorised train_example_counts(); any per-user call (a Python loop over users, e.g. the generic
    UserStore fallbacks) raises here, and a loop that only counted would run into the alarm."""
    import signal

    from fedsim.data import build_store
    from fedsim.plan import plan_els

    cfg = load_config(ROOT / "configs" / "scale_1e5.yaml", [
        "data.num_users=1000000", "data.min_examples=1", "els.k=4", "els.steps=5", "els.expected_batch=1000",
        "dp.noise_multiplier=1.0", "dp.epsilon=null"])
    store = build_store(cfg.data)

    def boom(*_):
        raise AssertionError("per-user work: an example was generated")

    for name in ("train_examples", "test_examples", "_generate", "num_examples"):
        monkeypatch.setattr(store, name, boom)

    def timeout(*_):
        raise TimeoutError("the ELS plan did per-user work at 10^6 users")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)  # a guard, not the assertion: a vectorised plan takes ~1 s, a loop many minutes
    try:
        plan = plan_els(cfg, store, group_bound=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    counts = store.train_example_counts()
    assert counts.size == 1_000_000 and counts.sum() > 2_000_000 and counts.max() > 4  # a long tail to cap
    kept = np.minimum(counts, 4)
    assert plan.num_examples == int(kept.sum())
    assert np.array_equal(np.bincount(plan.example_user, minlength=counts.size), kept)
    assert np.all(plan.example_index < counts[plan.example_user])
    assert np.all(np.diff(plan.example_user * 1000 + plan.example_index) > 0)  # (user, index) order, no repeats
    assert plan.q == pytest.approx(1000 / kept.sum())
    # the kept arrays are int arrays, 8 bytes per kept example each: no Python object per example
    assert plan.example_user.dtype == np.int64 and plan.example_index.dtype == np.int64
