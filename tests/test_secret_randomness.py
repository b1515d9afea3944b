"""The privacy of what runs (issue 13): secret sampling, cryptographic noise with full tails,
released metrics apart from diagnostics, per-user failures, secure resume, ELS non-finite
gradients. Each test fails on the code before the fix."""

import base64
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import fedsim.privacy.randomness as randomness
from fedsim.config import load_config
from fedsim.privacy import GaussianMechanism, PrivacyLedger
from fedsim.privacy.randomness import MAX_ABS_NORMAL, RandomStream, SecretRandomness
from fedsim.rundir import DIAGNOSTICS_HEADER, RELEASED_FIELDS, read_diagnostics, read_metrics
from fedsim.sampling import PoissonSampler

QUIET = {"say": lambda *_: None}
ELS_FAST = ["els.k=4", "els.accounting_interval=0.1", "els.expected_batch=8"]  # coarse PLD: still an upper bound


def _smoke(tmp_path, *extra):
    return load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "run.rounds=3", "run.eval_examples=16",
                                              *extra])


class DrawSpy:
    """Records every Poisson sample a run draws, by purpose and step."""

    def __init__(self, monkeypatch):
        self.draws: list[tuple[str, int, tuple]] = []
        real = PoissonSampler.sample
        spy = self

        def sample(sampler, step):
            ids = real(sampler, step)
            spy.draws.append((sampler.purpose, int(step), tuple(ids.tolist())))
            return ids

        monkeypatch.setattr(PoissonSampler, "sample", sample)

    def of(self, purpose):
        return [(s, ids) for p, s, ids in self.draws if p == purpose]


# -- 1. secret sampling ----------------------------------------------------------------------
@pytest.mark.parametrize("reproducible", [False, True], ids=["secure", "reproducible"])
def test_two_runs_with_the_same_seed_draw_cohorts_and_els_samples_by_mode(tmp_path, monkeypatch, reproducible):
    from fedsim.loop import run_els
    from fedsim.loop import run_uls

    spy = DrawSpy(monkeypatch)
    mode = f"dp.reproducible={str(reproducible).lower()}"
    quick = ["dp.noise_multiplier=1.0", "dp.epsilon=null", "dp.accountant=rdp"]  # no calibration
    for i in range(2):
        run_uls(_smoke(tmp_path / f"uls{i}", mode, "uls.expected_cohort=8", "run.rounds=2", "run.eval_every=10",
                       *quick), **QUIET)
        run_els(_smoke(tmp_path / f"els{i}", mode, "els.steps=2", "els.eval_every=10", *ELS_FAST, *quick[:2]), **QUIET)
    uls, els = spy.of("uls-cohort"), spy.of("els-sample")
    assert len(uls) == 4 and len(els) == 4
    same_uls, same_els = uls[:2] == uls[2:], els[:2] == els[2:]
    assert (same_uls, same_els) == (reproducible, reproducible)


# -- 2. noise from a cryptographic generator, full tails -------------------------------------
def test_seeds_differing_only_above_bit_32_give_different_noise():
    # torch's CPU generator keeps the low 32 bits of a seed: s and s + 2^32 were the same noise
    mech = GaussianMechanism(1.0, 1.0)
    a = mech.add_noise(torch.zeros(1000), SecretRandomness.from_seed(5).stream("uls-noise", 1))[0]
    b = mech.add_noise(torch.zeros(1000), SecretRandomness.from_seed(5 + 2**32).stream("uls-noise", 1))[0]
    c = mech.add_noise(torch.zeros(1000), SecretRandomness.from_seed(5).stream("uls-noise", 1))[0]
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_secure_noise_is_not_reproducible_from_the_run_directory(tmp_path, monkeypatch):
    from fedsim.loop import run_uls

    keys = []
    real = SecretRandomness.secure.__func__

    def secure(cls):
        inst = real(cls)
        keys.append(inst._key)
        return inst

    monkeypatch.setattr(SecretRandomness, "secure", classmethod(secure))
    cfg = _smoke(tmp_path, "dp.reproducible=false", "run.checkpoint_every=1", "run.rounds=2", "run.eval_every=10",
                 "dp.noise_multiplier=1.0", "dp.epsilon=null", "dp.accountant=rdp")
    runs = [run_uls(cfg, **QUIET) for _ in range(2)]
    dirs = [d for d, _ in runs]
    assert len(keys) == 2 and keys[0] != keys[1]
    # summary.json states the source of every secret draw
    r = runs[0][1]["randomness"]
    assert runs[0][1]["noise_source"] == r["source"] == "os-entropy"
    assert "os.urandom" in r["key"] and "AES-256-CTR" in r["generator"]
    assert {"cohort_sampling", "example_sampling", "noise", "public_seed_drives"} <= set(r)
    # the same config (same run.seed) twice: different noise, so different released models
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "final_weights.safetensors")) for d in dirs)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # nothing written holds the key, in any encoding
    for key, d in zip(keys, dirs):
        blobs = [p.read_bytes() for p in d.rglob("*") if p.is_file()]
        for enc in (key, key.hex().encode(), base64.b64encode(key), base64.b64encode(key)[:20]):
            assert not any(enc in blob for blob in blobs)
    # and the key a reader could derive from the written run.seed is not the run's key
    cfg_seed = load_config(str(dirs[0] / "config.yaml")).run.seed
    assert json.loads((dirs[0] / "summary.json").read_text())["noise_source"] == "os-entropy"
    assert SecretRandomness.from_seed(cfg_seed)._key not in keys


def test_box_muller_reaches_beyond_8_sigma(monkeypatch):
    # all-zero keystream words give the radius's smallest uniform, 2^-107: r = sqrt(214 ln 2) = 12.18
    monkeypatch.setattr(RandomStream, "_raw_words", lambda self, n: np.zeros(n, dtype=np.uint64))
    z = SecretRandomness.from_seed(0).stream("t", 0).normal(4)
    assert float(z.abs().max()) == pytest.approx(MAX_ABS_NORMAL) and MAX_ABS_NORMAL > 12


def test_the_radius_uniform_is_refined_near_zero(monkeypatch):
    # one 53-bit word would make the smallest radius uniforms k 2^-53, far apart in -ln u (rings
    # coarser than the rounding grid in the tail): a coarse cell (hi < 2^20) is subdivided by a
    # second word, so the values land off the one-word grid, inside their cell
    real = RandomStream._raw_words
    calls = []

    def words(self, n):
        calls.append(n)
        if len(calls) == 1:  # the first draw: hi = 0, 1, ..., n-1 (all coarse), then 2^20 (not)
            w = np.arange(n, dtype=np.uint64)
            w[-1] = 2**20
            return w << np.uint64(11)
        return real(self, n)

    monkeypatch.setattr(RandomStream, "_raw_words", words)
    u = SecretRandomness.from_seed(4).stream("t", 0).uniform_open(1000) * 2.0**53
    assert calls == [1000, 999]  # one more word for each coarse cell
    k = torch.arange(1000, dtype=torch.float64)
    assert bool(((u[:-1] > k[:-1]) & (u[:-1] < k[:-1] + 1)).all())  # inside its cell
    assert float((u[:-1] - k[:-1] != 0.5).double().mean()) > 0.99  # not the cell's midpoint
    assert float(u[-1]) == 2**20 + 0.5  # a fine cell keeps its midpoint


def test_read_ahead_gives_the_same_keystream_and_refuses_mixed_reads(monkeypatch):
    big = randomness.READ_AHEAD_WORDS * 3 + 5  # several blocks read ahead on the helper thread
    a = SecretRandomness.from_seed(9).stream("t", 0).normal(big)
    monkeypatch.setattr(randomness, "READ_AHEAD_WORDS", 1 << 40)  # no read-ahead: one synchronous read
    b = SecretRandomness.from_seed(9).stream("t", 0).normal(big)
    assert torch.equal(a, b)
    monkeypatch.undo()
    s = SecretRandomness.from_seed(9).stream("t", 0)
    s.normal(big)
    with pytest.raises(RuntimeError, match="never both"):
        s.words(4)


def test_uniforms_have_53_bits():
    # a 24-bit uniform (torch's float32) has no odd multiples of 2^-53: half of these do
    u = SecretRandomness.from_seed(1).stream("t", 0).uniform(100_000)
    odd = (u * 2.0**53).to(torch.int64) % 2
    assert 0.49 < float(odd.double().mean()) < 0.51
    assert float(u.min()) >= 0 and float(u.max()) < 1


def test_gaussian_sampler_tails_and_ks_against_n01():
    s = SecretRandomness.from_seed(2).stream("t", 0)
    z = s.normal(1_000_000).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3
    # 10^8 draws: the count beyond 5 sigma is Binomial(n, 5.7e-7), mean 57
    n, beyond5, beyond58 = 100_000_000, 0, 0
    for start in range(0, n, 1 << 22):
        x = s.normal(min(1 << 22, n - start)).abs_()
        beyond5 += int((x > 5.0).sum())
        beyond58 += int((x > 5.8).sum())
    p5 = 2 * stats.norm.sf(5.0)
    assert abs(beyond5 - n * p5) < 5 * math.sqrt(n * p5)
    assert beyond58 <= 8  # mean 0.66 (torch's float32 sampler: exactly 0 by construction)


@pytest.mark.slow
def test_a_billion_draws_reach_past_torchs_cutoff():
    s = SecretRandomness.secure().stream("t", 0)
    n, beyond, top = 1_000_000_000, 0, 0.0
    for start in range(0, n, 1 << 22):
        x = s.normal(min(1 << 22, n - start)).abs_()
        beyond += int((x > 5.8).sum())
        top = max(top, float(x.max()))
    p = 2 * stats.norm.sf(5.8)  # mean 6.6: P(0) = 0.0014
    assert 1 <= beyond and abs(beyond - n * p) < 5 * math.sqrt(n * p) + 1
    assert top > 5.8


def test_noise_has_std_sigma_c_and_is_rounded_to_a_fine_grid():
    mech = GaussianMechanism(0.5, 1.3)
    x = torch.full((200_000,), 0.123456789)
    out, released = mech.add_noise(x.clone(), SecretRandomness.from_seed(3).stream("t", 0))
    assert float((out - x).std()) == pytest.approx(0.65, rel=0.01)
    grid = 2.0 ** (math.floor(math.log2(0.65)) - randomness.SNAP_BITS)
    on_grid = out.double() / grid
    assert torch.equal(on_grid, on_grid.round())  # snapped (floating-point hardening)
    assert set(released) == {"noise_std", "expected_noise_norm"}  # never the realised noise norm
    assert released["expected_noise_norm"] == pytest.approx(0.65 * math.sqrt(200_000))


def test_lmo_noise_with_infinite_variance_still_draws():
    # Gamma alone with G_k <= 2: E[1/t^2] diverges, so the std is infinite; the rounding grid
    # uses the finite Laplace scale at the mean rate instead
    from fedsim.privacy.lmo import LmoMechanism, LmoParams

    p = LmoParams(a1=1.0, a3=0.0, a4=0.0, G_k=1.5, G_theta=1.0, E_lambda=1.0, U_a=0.0, U_b=1.0)
    mech = LmoMechanism(1.0, p)
    assert not math.isfinite(mech.noise_std())
    out, _ = mech.add_noise(torch.zeros(1000), SecretRandomness.from_seed(1).stream("n", 1))
    assert torch.isfinite(out).all() and float(out.abs().sum()) > 0


def test_lmo_noise_comes_from_the_keystream():
    from fedsim.privacy.lmo import LmoMechanism, LmoParams

    p = LmoParams(a1=0.2, a3=0.3, a4=0.5, G_k=2.0, G_theta=1.0, E_lambda=1.0, U_a=0.5, U_b=1.5)
    mech = LmoMechanism(1.0, p)
    a = mech.add_noise(torch.zeros(5000), SecretRandomness.from_seed(5).stream("n", 1))[0]
    b = mech.add_noise(torch.zeros(5000), SecretRandomness.from_seed(5 + 2**32).stream("n", 1))[0]
    assert not torch.equal(a, b) and torch.isfinite(a).all()


# -- 3. outputs split by what the guarantee covers -------------------------------------------
@pytest.mark.parametrize("method", ["uls", "els"])
def test_metrics_hold_only_released_fields_and_diagnostics_are_labelled(tmp_path, method):
    from fedsim.loop import run_els
    from fedsim.loop import run_uls

    if method == "uls":
        run_dir, _ = run_uls(_smoke(tmp_path), **QUIET)
    else:
        run_dir, _ = run_els(_smoke(tmp_path, "els.steps=3", *ELS_FAST), **QUIET)
    rows = read_metrics(run_dir)
    assert len(rows) == 4 and all(set(r) <= RELEASED_FIELDS for r in rows)
    assert {"epsilon", "noise_std", "update_norm"} <= set(rows[-1])
    first = json.loads((run_dir / "diagnostics.jsonl").read_text().splitlines()[0])
    assert first == DIAGNOSTICS_HEADER and "OUTSIDE" in first["diagnostics"]
    diag = read_diagnostics(run_dir)
    assert "eval_loss" in diag[0] and "train_loss" in diag[1] and "signal_norm" in diag[1]
    text = "".join(p.read_text() for p in run_dir.glob("*.jsonl"))
    assert "noise_norm\"" not in text.replace("expected_noise_norm\"", "")  # the realised noise norm: never
    # the ledger records the event only: no realised cohort or batch size
    assert all(set(e) == {"step", "event"} for e in PrivacyLedger(run_dir / "privacy_ledger.jsonl").entries)


# -- 4. per-user sensitivity under faults ----------------------------------------------------
@pytest.mark.parametrize("vectorise", [False, True], ids=["sequential", "vectorised"])
def test_a_cohort_worker_drops_only_the_failing_user(monkeypatch, vectorise):
    from fedsim.data import build_store
    from fedsim.models import build_task
    from fedsim.training.worker import CohortWorker

    cfg = load_config("configs/smoke.yaml", [f"uls.vectorise={str(vectorise).lower()}"])
    store = build_store(cfg.data)
    worker = CohortWorker(build_task(cfg, store, log=lambda *_: None), store, cfg)
    w = worker.task.flat.get().clone()
    users = [0, 3, 5, 7]
    others = worker.train_users([0, 5, 7], w, server_round=2)
    real_examples = store.train_examples

    def broken(u):
        if u == 3:
            raise RuntimeError("user 3's data breaks the tokenizer")
        return real_examples(u)

    monkeypatch.setattr(store, "train_examples", broken)
    got = worker.train_users(users, w, server_round=2)
    assert got.failed == 1 and got.num_users == 3
    torch.testing.assert_close(got.delta_sum, others.delta_sum, rtol=1e-5, atol=1e-6)


# -- 5. a secure resume re-draws -------------------------------------------------------------
class Killed(BaseException):
    """In-process stand-in for the SIGKILL of `simulation.faults.server_crash_round`."""


@pytest.mark.parametrize("reproducible", [False, True], ids=["secure", "reproducible"])
def test_a_resume_redraws_the_redone_round_only_in_secure_mode(tmp_path, monkeypatch, reproducible):
    import os

    from fedsim.loop import resume, run_uls

    spy = DrawSpy(monkeypatch)
    cfg = _smoke(tmp_path, f"dp.reproducible={str(reproducible).lower()}", "run.checkpoint_every=1",
                 "simulation.faults.server_crash_round=2", "uls.expected_cohort=10",
                 "dp.noise_multiplier=1.0", "dp.epsilon=50")  # room for the re-done round
    with pytest.MonkeyPatch.context() as mp:  # die right after round 2's release is recorded
        mp.setattr(os, "kill", lambda pid, sig: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            run_uls(cfg, **QUIET)
    run_dir = tmp_path / "smoke"
    assert len(PrivacyLedger(run_dir / "privacy_ledger.jsonl")) == 2  # round 2 was recorded before the crash
    first = dict(spy.of("uls-cohort"))
    spy.draws.clear()
    _, res = resume(run_dir, **QUIET)
    redone = dict(spy.of("uls-cohort"))[2]
    steps = [e["step"] for e in PrivacyLedger(run_dir / "privacy_ledger.jsonl").entries]
    if reproducible:  # the identical release: same cohort, counted once
        assert redone == first[2] and steps == [1, 2, 3]
    else:  # a new release: a fresh cohort (a fresh key), counted again
        assert redone != first[2] and steps == [1, 2, 2, 3]
    assert res["steps"] == 3 and res["epsilon"] <= 50


# -- 6. ELS: a non-finite per-example gradient -----------------------------------------------
@pytest.mark.parametrize("poisoned_sizes,dropped", [((6,), 1), ((6, 5), 2), ((6, 5, 4, 3), 6)],
                         ids=["once", "again-on-the-redo", "never-finite"])
def test_an_els_step_with_a_nan_gradient_stays_finite_and_counts_it(tmp_path, monkeypatch, poisoned_sizes, dropped):
    from fedsim.data import build_store
    from fedsim.models import build_task
    from fedsim.training.per_example import make_clipper

    cfg = load_config("configs/smoke.yaml")
    store = build_store(cfg.data)
    task = build_task(cfg, store, log=lambda *_: None)
    clipper = make_clipper(task, "auto")
    texts = [store.train_examples(u)[0] for u in range(6)]
    clean = clipper.clip_and_accumulate(task.batch(texts[dropped:]), 1.0) if dropped < 6 else None
    expected = task.flat.flat_grad.clone() if clean is not None else torch.zeros_like(task.flat.flat_grad)
    # poison the first example of a pass of these sizes: a NaN in its input embedding makes its
    # gradient NaN (a redo over the others can fail again, e.g. under new dropout masks)
    batch = task.batch(texts)
    emb = task.model.get_input_embeddings()
    real_forward = emb.forward

    def forward(ids):
        out = real_forward(ids)
        return out.index_put((torch.tensor([0]),), torch.tensor(float("nan"))) if out.shape[0] in poisoned_sizes else out

    monkeypatch.setattr(emb, "forward", forward)
    res = clipper.clip_and_accumulate(batch, 1.0)
    monkeypatch.undo()
    clipper.close()
    assert res.dropped == dropped and (clean is None or clean.dropped == 0)
    assert torch.isfinite(task.flat.flat_grad).all()
    torch.testing.assert_close(task.flat.flat_grad, expected, rtol=1e-4, atol=1e-6)
    assert 0.0 <= res.clipped_fraction(1.0) <= 1.0


# -- 6b. public quantities declared: q may be set directly ------------------------------------
def test_sampling_rates_may_be_set_directly(tmp_path):
    from fedsim.data import build_store
    from fedsim.plan import plan_els
    from fedsim.plan import sampling_rate

    from fedsim.errors import ConfigError
    from fedsim.plan import plan_uls

    cfg = _smoke(tmp_path, "uls.sampling_rate=0.25", "els.sampling_rate=0.1", "els.steps=2", *ELS_FAST)
    store = build_store(cfg.data)
    assert sampling_rate(cfg, store.num_users) == 0.25
    assert plan_els(cfg, store, group_bound=False).q == 0.1
    # the default delta is a function of N: with q set directly it must be given
    no_delta = _smoke(tmp_path, "uls.sampling_rate=0.25", "dp.delta=null")
    with pytest.raises(ConfigError, match="dp.delta"):
        plan_uls(no_delta, store.num_users)
