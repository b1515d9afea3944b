"""The shared workload of issue 7: seconds per round and users/s of five ways to run it.

    python bench/shared_workload.py                 # 3 interleaved repetitions of every variant
    python bench/shared_workload.py --reps 1 --variants floor fedsim_cohort

Workload (issue 7, item 5): a GPT-2-style model from config (2 layers, width 128, 2 heads,
byte vocabulary, context 64, seed 0; full-model training, 437,888 weights), 2,000 synthetic
users each holding 8 training sequences of 64 bytes from a user-specific distribution
(`SyntheticTokenStore.benchmark()`: 10 per user, 2 held out), q = 0.05 (cohort ~100),
one local step (batch 8, SGD lr 0.1), clip 1.0, noise multiplier 1.0, server SGD lr 1.0,
5 rounds. Reported: median seconds per round of rounds 2-5 and users/s for

  floor          a plain single-process torch loop over the cohort (reset weights, step,
                 delta, clip, accumulate, noise, server step)
  fedsim_node    fedsim ULS, one user per Flower node (Ray backend, `fedsim.simulate.run_uls`)
  fedsim_cohort  fedsim cohort workers (`uls.users_per_client`: the whole cohort in one message
                 to one worker, so training uses one core like the floor)
  fedsim_cohort2 cohort workers, the cohort split over two workers (two Ray actors, 2 cores)
  fedsim_vector  fedsim vectorised users (`uls.vectorise`, `uls.vector_users`), one worker
  floor_compile  the floor with `torch.compile(model)` (inductor; compiled in round 1, which
                 is not counted; its wall time is in the JSON)
  flower_dp      Flower's own `DifferentialPrivacyServerSideFixedClipping` around `FedAvg`
                 (flwr 1.41 message API), a ClientApp that caches the model per Ray actor,
                 one user per Flower node: the reference a Flower user has today
  fedsim_inprocess  the cohort worker in the server's process (`simulation.backend: inprocess`:
                 the same Flower messages and strategy, no Ray): one process, like pfl-research
  pfl            pfl-research 0.6.0 (`bench/peers/pfl_workload.py`, in its own venv made by
                 `bench/peers/setup_pfl.sh`; never a fedsim dependency): FedAvg with central
                 Gaussian DP on the same exported users and initial weights, 1 thread
  pfl_2threads   the same with 2 torch threads (one process)
  pfl_2proc      the same as 2 worker processes of 1 thread (`torchrun`, gloo): pfl-research's
                 own way of using more cores

Every variant runs in a fresh subprocess with 1 torch thread per process (Ray pins its
actors to 1 thread as well); peak memory is the largest sum of RSS over the process tree
(the subprocess and every descendant: Ray's GCS, raylet, workers), sampled every 0.2 s by
a psutil thread. The machine is shared and noisy: variants are interleaved (rotated order
per repetition) and the median and range over repetitions are reported. The same Poisson
cohorts (seed 0) are drawn by the floor and every fedsim variant; Flower's FedAvg samples a
fixed 100 nodes per round. users/s = median over rounds 2-5 of (users trained / seconds).

Prints one JSON object, also written to bench/out/shared_workload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

VARIANTS = ["floor", "fedsim_node", "fedsim_cohort", "fedsim_cohort2", "fedsim_vector", "flower_dp", "floor_compile",
            "pfl", "pfl_2threads", "pfl_2proc", "fedsim_inprocess"]
DEFAULT_VARIANTS = VARIANTS[:6]  # floor_compile and the pfl-research peer (its own venv) on request
PFL_VARIANTS = {"pfl": (1, 1), "pfl_2threads": (2, 1), "pfl_2proc": (1, 2)}  # (threads, processes)
DEFAULT_PFL_PYTHON = ROOT / "bench" / "peers" / ".venv-pfl" / "bin" / "python"
NUM_USERS, COHORT, ROUNDS = 2000, 100.0, 5


class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2, include_self: bool = True):
        import psutil

        self.proc, self.interval, self.peak, self.include_self = psutil.Process(), interval, 0, include_self
        self.peak_pss = 0  # the same sum of PSS: pages shared by processes (torch's libraries) counted once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = pss = 0
        for p in [self.proc] * self.include_self + self.proc.children(recursive=True):
            try:
                mem = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total, pss = total + mem.rss, pss + mem.pss
        self.peak_pss = max(self.peak_pss, pss)
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def workload_overrides(out_dir: str) -> list[str]:
    return [
        f"run.output_dir={out_dir}", f"run.rounds={ROUNDS}", "run.seed=0", "run.eval_every=1000", "run.eval_examples=8",
        "run.threads=1",
        "data.source=synthetic", f"data.num_users={NUM_USERS}", "data.examples_per_user=10", "data.test_fraction=0.2",
        "data.seq_len=64", "data.seed=0",
        "model.source=config", "model.arch.n_layer=2", "model.arch.n_embd=128", "model.arch.n_head=2",
        "model.lora.enabled=false", "model.pretrain.enabled=false",
        f"uls.expected_cohort={COHORT}", "uls.local_epochs=1", "uls.batch_size=8", "uls.client_optimizer=sgd",
        "uls.client_lr=0.1", "uls.server_optimizer=sgd", "uls.server_lr=1.0",
        "dp.clip_norm=1.0", "dp.noise_multiplier=1.0", "dp.epsilon=null", "dp.reproducible=true",
        "simulation.backend=ray", "simulation.num_cpus=1",
    ]


# -- (i) the floor ---------------------------------------------------------------------------
def run_floor(args, compile_model: bool = False) -> dict:
    import torch

    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.models import build_task
    from fedsim.privacy.randomness import SecretRandomness
    from fedsim.sampling import PoissonSampler
    from fedsim.training.local import local_batches, user_generator

    torch.set_num_threads(1)
    cfg = load_config(None, workload_overrides(tempfile.gettempdir()))
    store = build_store(cfg.data)
    task = build_task(cfg, store, log=lambda *_: None)  # the same model, init and flat views as fedsim
    model, flat = task.model, task.flat
    if compile_model:
        model = torch.compile(model)
    sampler = PoissonSampler(store.num_users, COHORT / store.num_users, SecretRandomness.from_seed(0), "uls-cohort")
    noise_gen = torch.Generator().manual_seed(7919)
    w = flat.get()
    times, cohorts = [], []
    for rnd in range(1, ROUNDS + 1):
        t0 = time.perf_counter()
        cohort = sampler.sample(rnd)
        acc = torch.zeros_like(w)
        for u in cohort.tolist():
            gen = user_generator(0, rnd, u)
            ex = store.train_examples(u)
            idx = local_batches(len(ex), 8, 1, None, gen)[0]
            flat.flat.copy_(w)  # reset
            flat.flat_grad.zero_()
            loss = model(**task.batch([ex[i] for i in idx])).loss
            loss.backward()
            with torch.no_grad():
                flat.flat.add_(flat.flat_grad, alpha=-0.1)  # local SGD step
                delta = flat.flat - w
                norm = float(delta.pow(2).sum(dtype=torch.float64).sqrt())
                acc.add_(delta, alpha=min(1.0, 1.0 / (norm + 1e-6)))  # clip, accumulate
        noise = torch.randn(w.shape, generator=noise_gen) * 1.0  # sigma * C
        w = w + 1.0 * (acc + noise) / COHORT  # server SGD, lr 1, on the noisy mean over q*N
        times.append(time.perf_counter() - t0)
        cohorts.append(int(cohort.size))
    return {"round_times": times, "cohorts": cohorts}


# -- (ii)-(iv) fedsim --------------------------------------------------------------------------
def run_fedsim(args, variant: str) -> dict:
    from fedsim.config import load_config
    from fedsim.loop import run_uls

    extra = {
        "fedsim_node": ["uls.users_per_client=1"],
        "fedsim_cohort": ["uls.users_per_client=1000", "simulation.num_workers=1"],
        "fedsim_cohort2": ["uls.users_per_client=60", "simulation.num_workers=2"],
        "fedsim_vector": ["uls.users_per_client=1000", "simulation.num_workers=1", "uls.vectorise=true",
                          f"uls.vector_users={args.vector_users}"],
        "fedsim_inprocess": ["uls.users_per_client=1000", "simulation.num_workers=1", "simulation.backend=inprocess"],
    }[variant]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, workload_overrides(tmp) + extra + [f"run.name={variant}"])
        run_dir, _ = run_uls(cfg, say=lambda *_: None)
        from fedsim.rundir import read_diagnostics

        rows = read_diagnostics(run_dir)  # per-round wall time and realised cohort: simulation diagnostics
    rows = [r for r in rows if r.get("round", 0) >= 1]
    return {"round_times": [r["time"] for r in rows], "cohorts": [r["users"] for r in rows],
            "messages": [r.get("messages") for r in rows]}


# -- (v) Flower's own DP wrapper -----------------------------------------------------------------
def _flower_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import types

        import torch

        # the model, data and tokenizer are built once per Ray actor (process), not per message
        cache = sys.modules.get("_shared_workload_cache")
        if cache is None:
            cache = sys.modules["_shared_workload_cache"] = types.ModuleType("_shared_workload_cache")
            torch.set_num_threads(1)
            from fedsim.config import load_config
            from fedsim.data import build_store
            from fedsim.models.causal_lm import _gpt2_from_arch
            from fedsim.models.tokenizer import ByteTokenizer

            cfg = load_config(None, workload_overrides(tempfile.gettempdir()))
            cache.store = build_store(cfg.data)
            cache.tok = ByteTokenizer()
            cache.model = _gpt2_from_arch(cfg.model.arch, 64, cache.tok.vocab_size, 0)
            cache.model.train()
        from fedsim.models.causal_lm import encode_lm_batch
        from fedsim.training.local import local_batches, user_generator

        model = cache.model
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        u = int(context.node_config["partition-id"])  # node i holds user i
        ex = cache.store.train_examples(u)
        idx = local_batches(len(ex), 8, 1, None, user_generator(0, 0, u))[0]
        batch = encode_lm_batch(cache.tok, [ex[i] for i in idx], 64, "cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return Message(RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(idx), "train-loss": float(loss)}),
        }), reply_to=msg)

    return app


def run_flower_dp(args) -> dict:
    import logging

    import torch
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.simulation import run_simulation

    from fedsim.config import load_config
    from fedsim.models.causal_lm import _gpt2_from_arch
    from fedsim.simulate import _shutdown_ray, quiet_logs

    torch.set_num_threads(1)
    quiet_logs(False)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = load_config(None, workload_overrides(tempfile.gettempdir()))
    stamps: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = _gpt2_from_arch(cfg.model.arch, 64, 257, 0)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(fraction_train=COHORT / NUM_USERS, fraction_evaluate=0.0, min_train_nodes=2,
                   min_available_nodes=2),
            noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=int(COHORT))

        def evaluate_fn(server_round: int, arrays: ArrayRecord):
            stamps.append(time.perf_counter())  # called before round 1 and after every round
            return None

        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=ROUNDS,
                       evaluate_fn=evaluate_fn)

    run_simulation(server_app=server, client_app=_flower_client_app(), num_supernodes=NUM_USERS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    _shutdown_ray()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"round_times": times, "cohorts": [int(COHORT)] * len(times)}


# -- (vi) the pfl-research peer -----------------------------------------------------------------
def export_workload(out_dir: Path) -> None:
    """The workload as files pfl-research's venv can read without fedsim: every user's training
    sequences encoded by fedsim's tokenizer (users.npz), the model's initial weights
    (init.safetensors: `build_task`'s model, the same init as every fedsim variant and the
    floor) and its GPT-2 config and hyper-parameters (workload.json)."""
    import numpy as np
    from safetensors.torch import save_file

    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.models import build_task

    cfg = load_config(None, workload_overrides(tempfile.gettempdir()))
    store = build_store(cfg.data)
    task = build_task(cfg, store, log=lambda *_: None)
    batches = [task.batch(store.train_examples(u)) for u in range(store.num_users)]
    np.savez(out_dir / "users.npz",
             input_ids=np.stack([b["input_ids"].numpy() for b in batches]),
             attention_mask=np.stack([b["attention_mask"].numpy() for b in batches]))
    save_file({k: v.detach().clone() for k, v in task.model.state_dict().items()}, out_dir / "init.safetensors")
    gpt2 = {k: v for k, v in task.model.config.to_dict().items()
            if k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "resid_pdrop", "embd_pdrop",
                     "attn_pdrop", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    (out_dir / "workload.json").write_text(json.dumps({
        "gpt2_config": gpt2, "rounds": ROUNDS, "expected_cohort": COHORT, "clip": 1.0, "noise_multiplier": 1.0,
        "server_lr": 1.0, "client_lr": 0.1, "batch_size": 8}))


def run_pfl(args) -> dict:
    threads, procs = PFL_VARIANTS[args.child]
    py = Path(args.pfl_python)
    script = str(ROOT / "bench" / "peers" / "pfl_workload.py")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    base = ["--workload", args.workload, "--out", out, "--threads", str(threads)]
    cmd = ([str(py), script] if procs == 1 else
           [str(py.parent / "torchrun"), "--standalone", f"--nproc_per_node={procs}", script])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    proc = subprocess.run(cmd + base, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pfl-research failed:\n{proc.stderr[-3000:]}")
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def child(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a peer runs in its own interpreter: count its process tree only, not this launcher
    with PeakRSS(include_self=args.child not in PFL_VARIANTS) as mem:
        t0 = time.perf_counter()
        if args.child in PFL_VARIANTS:
            res = run_pfl(args)
        elif args.child in ("floor", "floor_compile"):
            res = run_floor(args, compile_model=args.child == "floor_compile")
        elif args.child == "flower_dp":
            res = run_flower_dp(args)
        else:
            res = run_fedsim(args, args.child)
        res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = mem.peak / 2**20
    res["peak_pss_mb"] = mem.peak_pss / 2**20
    Path(args.out).write_text(json.dumps(res))


# -- parent: interleave, aggregate ---------------------------------------------------------------
def steady(res: dict) -> tuple[float, float]:
    """(median s/round, median users/s) over rounds 2-5 (per round: users trained / seconds)."""
    t, c = res["round_times"][1:], res["cohorts"][1:]
    return statistics.median(t), statistics.median(ci / ti for ci, ti in zip(c, t))


def main() -> None:
    global ROUNDS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    ap.add_argument("--vector-users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="rounds per run (the workload: 5)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "shared_workload.json"))
    ap.add_argument("--pfl-python", default=os.environ.get("FEDSIM_PFL_PYTHON", str(DEFAULT_PFL_PYTHON)),
                    help="the python of pfl-research's venv (bench/peers/setup_pfl.sh)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ROUNDS = args.rounds
    if args.child:
        return child(args)
    workload_dir = tempfile.mkdtemp(prefix="shared_workload_")
    if any(v in PFL_VARIANTS for v in args.variants):
        if not Path(args.pfl_python).exists():
            sys.exit(f"pfl-research variants need its venv: run bash bench/peers/setup_pfl.sh (no {args.pfl_python})")
        export_workload(Path(workload_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDSIM_CACHE_DIR": os.environ.get("FEDSIM_CACHE_DIR", tempfile.gettempdir())}
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rep in range(args.reps):
        order = args.variants[rep % len(args.variants):] + args.variants[: rep % len(args.variants)]
        for v in order:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            cmd = [sys.executable, __file__, "--child", v, "--out", out, "--vector-users", str(args.vector_users),
                   "--rounds", str(ROUNDS), "--pfl-python", args.pfl_python, "--workload", workload_dir]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{v} (rep {rep + 1}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(Path(out).read_text())
            os.unlink(out)
            s, ups = steady(res)
            res.update(s_per_round=s, users_per_s=ups)
            runs[v].append(res)
            print(f"rep {rep + 1} {v}: {s:.3f} s/round, {ups:.1f} users/s, peak {res['peak_rss_mb']:.0f} MB"
                  f" (PSS {res['peak_pss_mb']:.0f} MB)",
                  file=sys.stderr, flush=True)
    summary = {}
    for v, rs in runs.items():
        if not rs:
            continue
        sp, ups = [r["s_per_round"] for r in rs], [r["users_per_s"] for r in rs]
        summary[v] = {"s_per_round_median": statistics.median(sp), "s_per_round_min": min(sp), "s_per_round_max": max(sp),
                      "users_per_s_median": statistics.median(ups), "users_per_s_min": min(ups),
                      "users_per_s_max": max(ups), "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
                      "peak_pss_mb_max": max(r["peak_pss_mb"] for r in rs),
                      "reps": len(rs)}
    floor = summary.get("floor")
    if floor:
        for v, s in summary.items():
            s["time_per_user_vs_floor"] = floor["users_per_s_median"] / s["users_per_s_median"]
            s["users_per_s_vs_floor"] = s["users_per_s_median"] / floor["users_per_s_median"]
    targets = {}
    if floor and "fedsim_cohort" in summary:
        targets["cohort_within_1.05x_of_floor"] = summary["fedsim_cohort"]["time_per_user_vs_floor"] <= 1.05
    if floor and "fedsim_vector" in summary:
        targets["vectorised_at_least_1.3x_floor_users_per_s"] = summary["fedsim_vector"]["users_per_s_vs_floor"] >= 1.3
    if "fedsim_node" in summary and "flower_dp" in summary:
        targets["node_per_user_no_slower_than_flower_dp"] = (
            summary["fedsim_node"]["users_per_s_median"] >= summary["flower_dp"]["users_per_s_median"])
    if "pfl" in summary and "fedsim_cohort" in summary:  # issue 18: the pfl-research peer
        one = summary["fedsim_cohort"]["users_per_s_median"] / summary["pfl"]["users_per_s_median"]
        targets["one_core_users_per_s_vs_pfl"] = one
        targets["one_core_at_least_1.2x_pfl"] = one >= 1.2
        for kind in ("rss", "pss"):
            mem = summary["fedsim_cohort"][f"peak_{kind}_mb_max"] / summary["pfl"][f"peak_{kind}_mb_max"]
            targets[f"one_worker_peak_{kind}_vs_pfl"] = mem
            targets[f"one_worker_{kind}_within_2x_pfl"] = mem <= 2.0
    two_pfl = [summary[v]["users_per_s_median"] for v in ("pfl_2threads", "pfl_2proc") if v in summary]
    if two_pfl and "fedsim_cohort2" in summary:
        two = summary["fedsim_cohort2"]["users_per_s_median"] / max(two_pfl)  # against pfl's faster 2-core way
        targets["two_cores_users_per_s_vs_pfl"] = two
        targets["two_cores_at_least_1.2x_pfl"] = two >= 1.2
    import platform

    import torch

    result = {
        "workload": {"users": NUM_USERS, "expected_cohort": COHORT, "rounds": ROUNDS, "model": "GPT-2 2x128x2, ctx 64, full",
                     "local": "1 step, batch 8, SGD lr 0.1", "clip": 1.0, "noise_multiplier": 1.0, "server_lr": 1.0,
                     "vector_users": args.vector_users, "threads_per_process": 1},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_end": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
        "summary": summary, "targets": targets,
        "runs": {v: [{k: r[k] for k in ("round_times", "cohorts", "peak_rss_mb", "peak_pss_mb", "wall_s", "s_per_round",
                                         "users_per_s")}
                     for r in rs] for v, rs in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
