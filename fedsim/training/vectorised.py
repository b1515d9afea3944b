"""Vectorised users: many users' one-step local training in ONE forward/backward pass.

User u's one local SGD step from the global weights w gives the delta ``(w - lr grad L_u(w)) - w``.
Every user starts from the same w, so their batches can be stacked into one. Sequences never
interact across the batch in a causal LM (layer norms act per token, attention within a
sequence), so the gradient of ``sum_u L_u`` w.r.t. a layer's output, restricted to u's rows, is
exactly that of u's own loss. With `HookClipper`'s book-keeping (layer inputs a, output gradients
g from one backward), u's weight gradient is ``g_u^T a_u`` over u's rows and tokens: ONE batched
product per layer over ``[users, rows x tokens, features]`` (the FLOPs of the ordinary weight
gradient). The resulting ``[users, d]`` gradients give deltas, norms and the clipped sum in a few
matrix ops, with the sequential path's arithmetic (`train_user`: same seeded batch, delta formed as
``(w - lr g) - w`` in the weights' dtype, float64 norms, the Opacus clip factor), so the clipped
sum matches it to float tolerance (`tests/test_vectorised.py`).

Supported: SGD, users whose local plan is a single batch, and the layers `HookClipper` supports.
Everything else (e.g. several local steps, which would need per-user weights after the first) is
trained sequentially, *explicitly*: logged once and counted in `CohortResult.sequential`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedsim.training.local import cap_examples, local_batches, user_generator
from fedsim.training.per_example import HookClipper, UnsupportedModelError, _norms, clip_factors

log = logging.getLogger("fedsim")


class UserGradients(HookClipper):
    """Per-user gradient sums of many users' batches from one forward and one backward."""

    name = "user-gradients"

    def __init__(self, task):
        super().__init__(task)
        self.slices = dict(zip(map(id, self.flat.params), self.flat.slices))

    def per_user(self, batch: dict[str, torch.Tensor], num_users: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G [U, d] per-user gradients of each user's mean loss, losses [U]).

        `batch` holds U consecutive groups of equal size (rows of user 0, then user 1, ...);
        padding rows must have no target tokens (labels -100 after the first position)."""
        rows = int(batch["input_ids"].shape[0])
        if rows % num_users:
            raise ValueError(f"{rows} rows do not split into {num_users} equal user groups")
        losses, calls, grads = self._record(batch, num_users)
        G = torch.zeros(num_users, self.flat.numel, dtype=self.flat.flat.dtype, device=self.flat.flat.device)
        with torch.no_grad():
            for (m, a, _), g in zip(calls, grads):
                if g is None:
                    continue
                # [rows, ..., F] -> [users, group * tokens, F]: per-example code gives per-user sums
                a = a.reshape(num_users, -1) if isinstance(m, nn.Embedding) else a.reshape(num_users, -1, a.shape[-1])
                g = g.reshape(num_users, -1, g.shape[-1])
                for kind, p in self._params(m):
                    G[:, self.slices[id(p)]].add_(self._per_example(m, kind, a, g).reshape(num_users, -1).to(G.dtype))
        return G, losses.detach()


class VectorisedUsers:
    """Trains a cohort worker's users in chunks of `uls.vector_users` (see the module docstring)."""

    def __init__(self, worker):
        self.worker = worker
        self.reason, self.grads = None, None
        if worker.cfg.uls.client_optimizer != "sgd":
            self.reason = f"client_optimizer {worker.cfg.uls.client_optimizer!r} (only plain SGD is vectorised)"
        else:
            try:
                self.grads = UserGradients(worker.task)
            except UnsupportedModelError as exc:
                self.reason = f"model not supported ({exc})"
        if self.reason is not None:
            log.warning("uls.vectorise: %s; these users are trained sequentially", self.reason)
        self._warned_steps = False

    def _plan(self, u: int, server_round: int):
        """The user's single local batch (texts), or None when it takes 0 or several steps."""
        cfg = self.worker.cfg  # read on every call: the worker's config may be replaced
        gen = user_generator(cfg.run.seed, server_round, int(u))
        examples = cap_examples(self.worker.store.train_examples(int(u)), cfg.uls.max_examples_per_user, gen)
        batches = local_batches(len(examples), cfg.uls.batch_size, cfg.uls.local_epochs, cfg.uls.local_steps, gen)
        return [examples[i] for i in batches[0]] if len(batches) == 1 else None

    def train_users(self, user_ids, global_flat: torch.Tensor, server_round: int, out, train_one) -> None:
        """Add every user's clipped delta to `out` (a CohortResult); `train_one(out, user,
        global_flat, round)` is the sequential path (one user, failures caught per user), used
        for fallback users and for every user of a grouped pass that raised."""

        def sequential(u):
            train_one(out, u, global_flat, server_round)
            out.sequential += 1

        single, multi = [], []
        for u in user_ids:
            try:
                texts = self._plan(u, server_round) if self.grads is not None else None
            except Exception:  # noqa: BLE001 -- the sequential path retries it and counts a failure
                texts = None
            (single if texts is not None else multi).append((int(u), texts))
        for u, _ in multi:
            if self.grads is not None and not self._warned_steps:
                log.warning("uls.vectorise: users with other than one local step are trained sequentially")
                self._warned_steps = True
            sequential(u)
        k = max(1, self.worker.cfg.uls.vector_users)
        for i in range(0, len(single), k):
            chunk = single[i : i + k]
            self.worker.task.flat.set(global_flat)  # every grouped pass runs at the global weights
            try:
                self._chunk(chunk, global_flat, out)
            except Exception as exc:  # noqa: BLE001 -- one user's failure must not drop the group
                log.warning("uls.vectorise: a grouped pass raised (%s); its users are trained one by one", exc)
                for u, _ in chunk:
                    sequential(u)

    def _chunk(self, chunk, global_flat: torch.Tensor, out) -> None:
        clip, lr = out.clip_norm, self.worker.cfg.uls.client_lr
        group = max(len(t) for _, t in chunk)
        # pad each user's rows with empty sequences (no targets, zero gradient)
        texts = [x for _, t in chunk for x in t + [""] * (group - len(t))]
        G, losses = self.grads.per_user(self.worker.task.batch(texts), len(chunk))
        # delta_u = (w - lr g_u) - w, in the weights' dtype, as the sequential SGD step
        D = torch.add(global_flat, G, alpha=-lr)
        del G
        D.sub_(global_flat)
        finite = torch.isfinite(D).all(1)
        norms = _norms(D)
        factors = torch.where(finite, clip_factors(norms, clip), torch.zeros_like(norms))
        D = torch.where(finite.unsqueeze(1), D, torch.zeros((), dtype=D.dtype, device=D.device))
        contribution = factors.to(D.dtype) @ D
        fin, nrm, los = finite.tolist(), norms.tolist(), losses.tolist()
        # nothing below can raise: the group's contribution and counts land together or not at
        # all (a failed pass is redone user by user, never added twice)
        out.delta_sum.add_(contribution)
        for (u, t), ok, n, loss in zip(chunk, fin, nrm, los):
            if not ok:
                out.failed += 1
                continue
            out.add_user(float(n), len(t), float(loss), clip)
            out.vectorised += 1
