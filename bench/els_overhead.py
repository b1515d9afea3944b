"""ELS step time vs a non-private step on the same batch and model, as a ratio in one run.

    python bench/els_overhead.py                      # default tiny model (2x128), LoRA and full
    python bench/els_overhead.py --size small         # GPT-2-small shape (12x768, byte vocab, ~85M weights)
    python bench/els_overhead.py --methods hooks,vmap,opacus --reps 15

A non-private step: mean loss over the batch, one backward, optimizer step. An ELS step:
per-example gradients clipped to C and summed (`training/per_example.py`), Gaussian
noise through the mechanism interface, division by the batch size, the same optimizer
step. The two are interleaved (A B A B ...) so machine load hits both alike; the report
is the median of the per-pair ratios with the 10th-90th percentile spread. Every method
is first checked against a naive batch-size-1 loop on a few examples. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(size: str, lora: bool, seq_len: int):
    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.models import build_task

    ov = [f"model.lora.enabled={lora}", f"data.seq_len={seq_len}"]
    if size == "small":  # GPT-2 small shape from config: random init, byte vocabulary, no pre-training
        ov += ["model.arch.n_layer=12", "model.arch.n_embd=768", "model.arch.n_head=12", "model.pretrain.enabled=false",
               "model.lora.r=8", "model.lora.target_modules=null"]
    cfg = load_config(ROOT / "configs" / "default.yaml", ov)
    store = build_store(cfg.data)
    return cfg, store, build_task(cfg, store, log=lambda *_: None)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def measure(task, batch, method: str, reps: int, clip: float, sigma: float = 1.0) -> dict:
    import torch

    from fedsim.privacy.mechanisms import GaussianMechanism
    from fedsim.training.per_example import make_clipper, nonprivate_step_grad
    from fedsim.training.server_opt import ServerOptimizer

    clipper = make_clipper(task, method)
    mech = GaussianMechanism(clip, sigma)
    from fedsim.privacy.randomness import SecretRandomness

    noise = SecretRandomness.secure().stream("els-noise", 0)  # one stream, consumed across steps
    opt = ServerOptimizer(task.flat.get(), "sgd", 1e-6)  # tiny lr: the weights barely move between timings
    n = batch["input_ids"].shape[0]

    def nonprivate():
        nonprivate_step_grad(task, batch)
        task.flat.set(opt.step(task.flat.flat_grad.div(-1.0)))

    def els():
        clipper.clip_and_accumulate(batch, clip)
        noisy, _ = mech.add_noise(task.flat.flat_grad, noise)
        task.flat.set(opt.step(noisy.div(-n)))

    try:
        nonprivate(), els()  # warm-up
        a, b = [], []
        for _ in range(reps):
            t = time.perf_counter()
            nonprivate()
            a.append(time.perf_counter() - t)
            t = time.perf_counter()
            els()
            b.append(time.perf_counter() - t)
    finally:
        clipper.close()
    ratios = [y / x for x, y in zip(a, b)]
    return {"method": clipper.name, "nonprivate_s": statistics.median(a), "els_s": statistics.median(b),
            "ratio_median": statistics.median(ratios), "ratio_p10": pct(ratios, 10), "ratio_p90": pct(ratios, 90),
            "reps": reps}


def check(task, batch, method: str, clip: float) -> float:
    """Max relative error of the clipped sum vs a naive batch-size-1 loop."""
    from fedsim.training.per_example import make_clipper

    naive = make_clipper(task, "naive")
    naive.clip_and_accumulate(batch, clip)
    want = task.flat.flat_grad.clone()
    c = make_clipper(task, method)
    try:
        c.clip_and_accumulate(batch, clip)
    finally:
        c.close()
    return float((task.flat.flat_grad - want).abs().max() / want.abs().max().clamp(min=1e-30))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--modes", default="lora,full", help="comma list of lora / full")
    p.add_argument("--methods", default=None, help="comma list of hooks / vmap / opacus (default: all for tiny;"
                                                    " hooks and opacus-for-LoRA for small, where B x d does not fit)")
    p.add_argument("--batch", type=int, default=None, help="examples per step (default 64 tiny, 8 small)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clip", type=float, default=0.1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    batch_size = args.batch or (64 if args.size == "tiny" else 8)
    out = {"size": args.size, "batch": batch_size, "seq_len": args.seq_len, "threads": args.threads,
           "torch": torch.__version__, "results": []}
    for mode in args.modes.split(","):
        cfg, store, task = build(args.size, mode == "lora", args.seq_len)
        texts = [x for u in range(store.num_users) for x in store.train_examples(u)][:batch_size]
        batch = task.batch(texts)
        small_batch = task.batch(texts[:4])
        methods = (args.methods.split(",") if args.methods else
                   ["hooks", "vmap", "opacus"] if args.size == "tiny" else ["hooks"] + (["opacus"] if mode == "lora" else []))
        for m in methods:
            row = {"mode": mode, "trainable_weights": task.flat.numel}
            try:
                row["max_rel_error_vs_naive"] = check(task, small_batch, m, args.clip)
                row.update(measure(task, batch, m, args.reps, args.clip))
            except Exception as exc:  # report, keep measuring the others
                row.update(method=m, error=f"{type(exc).__name__}: {exc}"[:300])
            out["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del task
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
