"""GPT-2-small-size model with LoRA through fedsim's cohort-worker path, on this CPU.

    python bench/gpt2_small_lora.py                    # 3 rounds x 2 users (~5 min on 2 loaded cores)
    python bench/gpt2_small_lora.py --rounds 4 --cohort 8

The model is configs/gpu.yaml's, built from config (random init): GPT-2 small's shape,
12 layers, width 768, 12 heads, GPT-2's 50,257-entry embedding / tied LM head, context 128
(123,751,680 parameters: GPT-2 small's 124,439,808 less 896 unused position rows). Text is
byte-tokenised (ids 0..256), so the vocabulary's compute is GPT-2's but only 257 ids occur.
LoRA r=8 on c_attn, c_proj, c_fc (attention and MLP projections of every block).

Per round: a cohort of `--cohort` users of a 342,477-user synthetic population (each with 8
training sequences of 128 bytes) is trained by one `CohortWorker` (what a Flower ClientApp
calls: reset to the global adapters, one local step of batch 8, delta, per-user clip, sum),
on the CPU, float32, `--threads` intra-op threads. Round 1 is warm-up; reported: median
seconds per round of rounds 2.., users/s, examples/s, tokens/s and the model FLOP/s they imply.

FLOPs per example (T = 128 tokens, N_mm = weights of the matrix multiplies: 12 blocks x
(768x2304 + 768x768 + 768x3072 + 3072x768) + the 768x50257 LM head = 123,532,032; the
embedding lookups are not multiplies):
  forward          F = T * (2 N_mm + 2 n_layer T d)     (the second term: attention scores
                                                          QK^T and AV, Kaplan et al. 2020)
  LoRA training    ~ 2F: forward F + backward F (gradients w.r.t. activations still flow
                    through every frozen matrix, 2 N_mm T; no weight gradients for the frozen
                    weights; the adapters add O(r/d) ~ 1%: counted exactly below)
  full training    ~ 3F (backward also computes the weight gradients, another 2 N_mm T).
Prints one JSON object, also written to bench/out/gpt2_small_lora.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flops_per_example(n_layer: int, d: int, vocab: int, T: int, lora_r: int, lora_weights: int) -> dict:
    block_mm = d * 3 * d + d * d + d * 4 * d + 4 * d * d  # c_attn, attn c_proj, c_fc, mlp c_proj
    n_mm = n_layer * block_mm + d * vocab
    attn = 2 * n_layer * T * d  # per token, forward (QK^T + AV over the context)
    fwd = T * (2 * n_mm + attn)
    lora_fwd = T * 2 * lora_weights  # x A then (xA) B: 2 flops per adapter weight per token
    return {
        "n_matmul_weights": n_mm,
        "forward": fwd + lora_fwd,
        # backward: activation grads through everything (= forward) + adapter weight grads (= adapter forward)
        "lora_train": 2 * (fwd + lora_fwd) + lora_fwd,
        "full_train": 3 * fwd,
        "formula": "forward F = T(2 N_mm + 2 L T d); LoRA train ~ 2F (+ adapter weight grads); full train ~ 3F",
    }


def build_worker(threads: int):
    """(cfg, store, task, CohortWorker) of the workload: configs/gpu.yaml on the CPU in float32,
    342,477 synthetic users of 8 training sequences."""
    import torch

    from fedsim.config import load_config
    from fedsim.data import build_store
    from fedsim.models import build_task
    from fedsim.training.worker import CohortWorker

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "gpu.yaml", [
        "run.device=cpu", "model.dtype=float32", "simulation.backend=inprocess", "simulation.num_gpus=0",
        "data.num_users=342477", "data.examples_per_user=10", "data.test_fraction=0.2",  # 8 train + 2 held out
        "uls.max_examples_per_user=8", "uls.batch_size=8", "uls.local_epochs=1", f"run.threads={threads}",
    ])
    store = build_store(cfg.data)
    task = build_task(cfg, store, log=lambda *_: None)
    return cfg, store, task, CohortWorker(task, store, cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cohort", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpt2_small_lora.json"))
    args = ap.parse_args()

    import numpy as np

    t0 = time.perf_counter()
    cfg, store, task, worker = build_worker(args.threads)
    T, a = cfg.data.seq_len, cfg.model.arch
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in task.model.parameters())
    n_train = task.flat.numel
    fl = flops_per_example(a.n_layer, a.n_embd, a.vocab_size, T, cfg.model.lora.r, n_train)

    rng = np.random.default_rng(0)
    global_flat = task.flat.get().detach().clone()
    rounds = []
    for r in range(1, args.rounds + 1):
        users = rng.choice(store.num_users, size=args.cohort, replace=False).tolist()
        t = time.perf_counter()
        res = worker.train_users(users, global_flat, r)
        dt = time.perf_counter() - t
        rounds.append({"round": r, "seconds": dt, "users": res.num_users, "examples": res.num_examples,
                       "failed": res.failed, "mean_loss": res.loss_sum / max(res.num_users, 1)})
        print(f"round {r}: {dt:.1f}s, {res.num_users} users, {res.num_examples} examples", file=sys.stderr)
    steady = rounds[1:] or rounds
    sec = statistics.median(x["seconds"] for x in steady)
    users = statistics.median(x["users"] for x in steady)
    examples = statistics.median(x["examples"] for x in steady)
    ex_s = examples / sec
    from provenance import provenance, write_result

    out = {
        "bench": "gpt2_small_lora", **provenance(), "torch_threads": args.threads,
        "model": {"n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head, "vocab_size": a.vocab_size,
                  "context": T, "parameters": n_params, "lora_r": cfg.model.lora.r,
                  "lora_targets": cfg.model.lora.target_modules, "trainable_weights": n_train,
                  "tokenizer": "bytes (ids 0..256 of the 50,257)"},
        "workload": {"cohort": args.cohort, "rounds": args.rounds, "examples_per_user": 8, "batch_size": 8,
                     "local_steps": 1, "path": "fedsim CohortWorker.train_users (the ClientApp's work), in-process"},
        "build_seconds": build_s,
        "rounds_detail": rounds,
        "seconds_per_round": sec, "users_per_s": users / sec, "examples_per_s": ex_s, "tokens_per_s": ex_s * T,
        "flops_per_example": fl,
        "achieved_model_flops_per_s": ex_s * fl["lora_train"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
