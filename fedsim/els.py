"""ELS: the centralized DP-SGD baseline with example-level sampling (docs/architecture.md,
"One ELS step"), as the training loop's method adaptor (`fedsim/loop.py`).

Each user keeps at most k of its training examples (a seeded choice, `plan.kept_examples`).
One step's clipped sum: every kept example joins the batch independently with probability q
(Poisson, drawn from the secret randomness source, `privacy/randomness.py`; the batch may be
empty, and then only noise is released); per-example gradients are clipped to C and summed
(`training/per_example.py`); an example whose gradient is not finite contributes zero
(dropped and counted). The loop then releases the sum divided by the *expected* batch q M
(a fixed denominator keeps the sensitivity C / (q M); Opacus does the same) and the optimizer
steps on the negated noisy mean. The user-level (epsilon, delta) is the Binomial(k, q)
mixture-of-Gaussians PLD composed over the steps (`GaussianMechanism.mixture_event`), the
tight accountant of Charles et al. 2024 (arXiv 2407.07737); the group-privacy bound is
reported beside it.

What the server sees: per-example clipped gradients (central DP, trusted server).
Same task, model, evaluation set and optimizer family (`ServerOptimizer`) as ULS.
"""

from __future__ import annotations

import torch


def clipped_sum(clipper, task, texts: list, clip_norm: float, micro_batch: int):
    """flat_grad <- sum of clipped per-example gradients over `texts`, in micro-batches."""
    from fedsim.training.per_example import ClipResult

    if len(texts) <= micro_batch:
        return clipper.clip_and_accumulate(task.batch(texts), clip_norm)
    total = torch.zeros_like(task.flat.flat_grad)
    parts = []
    for i in range(0, len(texts), micro_batch):
        parts.append(clipper.clip_and_accumulate(task.batch(texts[i : i + micro_batch]), clip_norm))
        total.add_(task.flat.flat_grad)
    task.flat.flat_grad.copy_(total)
    return ClipResult(torch.cat([p.norms for p in parts]), torch.cat([p.losses for p in parts]),
                      sum(p.dropped for p in parts))


class ElsMethod:
    """One ELS step's clipped sum: a secret Poisson sample of the kept examples, per-example
    gradients clipped to C and summed on the server's model."""

    name, key, sign = "ELS", "step", -1.0  # the sum is of gradients: the update is its negation

    def __init__(self, cfg, plan, store, task, randomness):
        from fedsim.auditing.canaries import canaries_of
        from fedsim.sampling import PoissonSampler
        from fedsim.training.per_example import make_clipper

        self.cfg, self.plan, self.store, self.task = cfg, plan, store, task
        self.sampler = PoissonSampler(plan.num_examples, plan.q, randomness, "els-sample")
        self.clipper = make_clipper(task, cfg.els.per_example)
        self.optimizer = (cfg.els.optimizer, cfg.els.lr, cfg.els.momentum)
        # `fedsim audit`: canary users' examples are in the plan; the excluded ones never join a batch
        self.canaries = canaries_of(store)
        self.included = self.canaries.inclusion(randomness) if self.canaries is not None else None

    def clipped_sum(self, step: int, weights: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict, int]:
        idx = self.sampler.sample(step)
        canary_users = None
        if self.canaries is not None:  # split off the canary examples (fedsim/auditing/canaries.py)
            j = self.canaries.index(self.plan.example_user[idx])
            canary_users, idx = j[j >= 0], idx[j < 0]
            canary_users = canary_users[self.included[canary_users]]
        texts = self.plan.texts(self.store, idx)
        clip = clip_norm
        res = clipped_sum(self.clipper, self.task, texts, clip, self.cfg.els.micro_batch)
        finite = res.norms[torch.isfinite(res.norms)]
        diagnostics = {  # contributions / unclipped: the examples in the sum, and those within C (adaptive clip)
            "contributions": int(finite.numel()), "unclipped": int((finite <= clip).sum()),
            "batch": len(texts), "dropped_examples": res.dropped, "clipped_frac": res.clipped_fraction(clip),
            "train_loss": float(res.losses[torch.isfinite(res.losses)].mean()) if finite.numel() else None,
            "grad_norm_median": float(finite.median()) if finite.numel() else None}
        if canary_users is not None:
            self._add_canaries(canary_users, clip)
            diagnostics["canary_examples"] = int(canary_users.size)
        return self.task.flat.flat_grad, diagnostics, len(texts)

    def _add_canaries(self, canary_users, clip: float) -> None:
        """flat_grad += the sampled canary examples' clipped gradients: -c_j x canary_norm x C for a
        gradient canary (clipped as any example's), the model's own gradient for a text canary."""
        grad = self.task.flat.flat_grad
        if not canary_users.size:
            return
        if self.canaries.kind == "text":
            real = grad.clone()
            texts = [self.canaries.text(int(j)) for j in canary_users]
            clipped_sum(self.clipper, self.task, texts, clip, self.cfg.els.micro_batch)
            grad.add_(real)
            return
        for j in canary_users:
            grad.add_(self.canaries.clipped_update(int(j), grad.numel(), clip, -1.0).to(grad.device, grad.dtype))

    def summary(self, ledger, plan, steps: int) -> dict:
        return {"per_example": self.clipper.name, "optimizer": self.cfg.els.optimizer, "lr": self.cfg.els.lr,
                "expected_compute": self.plan.denominator * steps,
                "trust_model": "central DP: a trusted server sees per-example clipped gradients"}

    def close(self) -> None:
        self.clipper.close()
