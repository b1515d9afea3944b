"""ULS local update: one user trains from the global weights; delta = w_local - w_global.

The caller clips the delta (`per_user_clip`); this module never sees privacy parameters. A
user's batches and dropout come from a generator seeded by (run seed, round, user), so its update
is the same whichever worker runs it and across a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalResult:
    delta: torch.Tensor  # w_local - w_global (flat, unclipped)
    num_examples: int  # example-gradient evaluations (the compute unit of compare)
    loss: float  # mean training loss over the local batches


def user_generator(seed: int, server_round: int, user: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + server_round) * 10_000_019 + user)


def local_batches(num_examples: int, batch_size: int, epochs: int, steps: int | None, gen: torch.Generator):
    """Index batches: `epochs` shuffled passes, or exactly `steps` batches cycling through passes."""
    batches: list[list[int]] = []
    while True:
        perm = torch.randperm(num_examples, generator=gen).tolist()
        for i in range(0, num_examples, batch_size):
            batches.append(perm[i : i + batch_size])
            if steps is not None and len(batches) == steps:
                return batches
        if steps is None and len(batches) >= epochs * -(-num_examples // batch_size):
            return batches


def cap_examples(examples, cap: int | None, gen: torch.Generator):
    """At most `cap` examples, a seeded choice (the ELS/ULS per-user cap)."""
    if cap is None or len(examples) <= cap:
        return list(examples)
    idx = torch.randperm(len(examples), generator=gen)[:cap].sort().values.tolist()
    return [examples[i] for i in idx]


def train_user(task, global_flat: torch.Tensor, examples, uls, gen: torch.Generator) -> LocalResult:
    """Reset to the global weights, run the client optimizer on the user's batches, return the delta."""
    flat = task.flat
    flat.set(global_flat)
    # dropout (e.g. LoRA's) draws from torch's global RNG: seed the CPU generator directly (1 us;
    # torch.manual_seed checks every backend, ~120 us), and the model's GPU if any
    dropout_seed = int(gen.initial_seed()) ^ 0x5EED
    torch.default_generator.manual_seed(dropout_seed)
    if flat.flat.is_cuda:
        with torch.cuda.device(flat.flat.device):
            torch.cuda.manual_seed(dropout_seed)
    examples = cap_examples(examples, uls.max_examples_per_user, gen)
    batches = local_batches(len(examples), uls.batch_size, uls.local_epochs, uls.local_steps, gen)
    opt = torch.optim.Adam(flat.params, lr=uls.client_lr) if uls.client_optimizer == "adam" else None
    losses, seen = [], 0
    for idx in batches:
        loss = task.loss(task.batch([examples[i] for i in idx]))
        flat.zero_grad()
        loss.backward()
        with torch.no_grad():  # plain SGD: one fused vector op on the flat buffers
            if opt is None:
                flat.flat.add_(flat.flat_grad, alpha=-uls.client_lr)
            else:
                opt.step()
        losses.append(float(loss.detach()))
        seen += len(idx)
    delta = flat.flat.detach() - global_flat.to(flat.flat.device)
    return LocalResult(delta=delta, num_examples=seen, loss=sum(losses) / max(1, len(losses)))
