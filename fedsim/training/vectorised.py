"""Vectorised users: many users' one-step local training in ONE forward/backward pass.

For one local SGD step from the global weights w, user u's delta is
``(w - lr * grad L_u(w)) - w`` with ``L_u`` the mean next-token loss over u's batch.
Every user starts from the same w, so the users' batches can be stacked into one large
batch (``vector_users`` users x batch rows). Sequences never interact across the batch
dimension in a causal LM (layer norms act per token, attention within a sequence), so
the gradient of the objective ``sum_u L_u`` w.r.t. a layer's output, restricted to user
u's rows, is exactly the gradient of u's own loss. Forward hooks (the "book-keeping"
machinery of `fedsim.training.per_example.HookClipper`) keep each trainable layer's input
a and output; one backward w.r.t. the layer outputs gives g; user u's weight gradient
of a Linear / Conv1D layer is then ``g_u^T a_u`` summed over u's rows and tokens: ONE
batched product per layer over the reshaped ``[users, rows x tokens, features]``
tensors (the same FLOPs as the ordinary weight gradient). Embeddings (tied or not),
positions and layer norms get the analogous per-user reductions. The result is a
``[users, d]`` matrix of per-user gradients, from which deltas, norms, clip factors and
the clipped sum are a handful of matrix ops.

The arithmetic of the sequential path (`train_user`) is kept: the same seeded batch of
each user, the delta formed as ``(w - lr g) - w`` in the parameters' dtype, norms in
float64, the Opacus clip factor. So the clipped sum equals the back-to-back path to
float tolerance (`tests/test_vectorised.py`).

Supported: SGD client optimizer, users whose local plan is a single batch (one local
step: ``local_steps: 1``, or one epoch over at most ``batch_size`` examples), any model
whose trainable layers are Linear / HF Conv1D / Embedding / LayerNorm (GPT-2 full
fine-tuning and peft LoRA). Everything else is trained sequentially, *explicitly*: the
worker logs the reason once and `CohortResult.sequential` counts those users. Users who
take several local steps would need per-user weights after the first step (vmap over
stacked weights); that path is not implemented here: they run back to back.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedsim.models.causal_lm import autocast_context
from fedsim.training.local import cap_examples, local_batches, user_generator
from fedsim.training.per_example import HookClipper, UnsupportedModelError, _as_3d

log = logging.getLogger("fedsim")


def unsupported_reason(cfg) -> str | None:
    """Why the config cannot be vectorised at all (None: it can, at least for one-step users)."""
    if cfg.uls.client_optimizer != "sgd":
        return f"client_optimizer {cfg.uls.client_optimizer!r} (only plain SGD is vectorised)"
    return None


class UserGradients(HookClipper):
    """Per-user gradient sums of many users' batches from one forward and one backward."""

    name = "user-gradients"

    def __init__(self, task):
        super().__init__(task)
        offs, off = {}, 0
        for p in self.flat.params:
            offs[id(p)] = (off, p.numel())
            off += p.numel()
        self.offsets = offs

    def _forward_token_losses(self, batch) -> torch.Tensor:
        kw = {}
        if self.positions:  # [B, T] position ids: see HookClipper
            n, t = batch["input_ids"].shape
            kw["position_ids"] = torch.arange(t, device=batch["input_ids"].device).expand(n, t)
        with autocast_context(self.task.device, self.task.cfg.model.dtype):
            logits = self.task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
        lg, lb = logits[:, :-1].float(), batch["labels"][:, 1:]
        ce = nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
        return ce.view(lb.shape)  # [B, T-1], 0 at ignored targets

    def per_user(self, batch: dict[str, torch.Tensor], num_users: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G [U, d] per-user gradients of each user's mean loss, losses [U]).

        `batch` holds U consecutive groups of equal size (rows of user 0, then user 1, ...);
        padding rows must have no target tokens (labels -100 after the first position)."""
        rows = int(batch["input_ids"].shape[0])
        if rows % num_users:
            raise ValueError(f"{rows} rows do not split into {num_users} equal user groups")
        counts = (batch["labels"][:, 1:] != -100).view(num_users, -1).sum(1).clamp(min=1)
        self._calls = []
        try:
            tok = self._forward_token_losses(batch)
        finally:
            calls, self._calls = self._calls, None
        for call in calls:
            if call.out.shape[0] != rows:
                raise UnsupportedModelError(f"a {type(call.module).__name__} layer runs on a batch-broadcast input")
        losses = tok.view(num_users, -1).sum(1) / counts  # each user's mean token loss (as HF's .loss)
        grads = torch.autograd.grad(losses.sum(), [c.out for c in calls], allow_unused=True)
        G = torch.zeros(num_users, self.flat.numel, dtype=self.flat.flat.dtype, device=self.flat.flat.device)
        with torch.no_grad():
            for call, g in zip(calls, grads):
                if g is None:
                    continue
                m = call.module
                # [rows, ..., F] -> [users, group * tokens, F]: per-example code gives per-user sums
                if isinstance(m, nn.Embedding):
                    a = call.inp.reshape(num_users, -1)
                    gu = g.reshape(num_users, -1, g.shape[-1])
                else:
                    a = _as_3d(call.inp).reshape(num_users, -1, call.inp.shape[-1])
                    gu = _as_3d(g).reshape(num_users, -1, g.shape[-1])
                for kind, p in self._params(m):
                    off, n = self.offsets[id(p)]
                    G[:, off : off + n].add_(self._per_example(m, kind, a, gu).reshape(num_users, -1).to(G.dtype))
        return G, losses.detach()


class VectorisedUsers:
    """Trains a cohort worker's users in chunks of `uls.vector_users` (see the module docstring)."""

    def __init__(self, worker):
        self.worker = worker
        self.reason = unsupported_reason(self.cfg)
        self.grads: UserGradients | None = None
        if self.reason is None:
            try:
                self.grads = UserGradients(worker.task)
            except UnsupportedModelError as exc:
                self.reason = f"model not supported ({exc})"
        if self.reason is not None:
            log.warning("uls.vectorise: %s; these users are trained sequentially", self.reason)
        self._warned_steps = False

    @property
    def cfg(self):
        return self.worker.cfg

    def _plan(self, u: int, server_round: int):
        """The user's single local batch (texts), or None when it takes 0 or several steps."""
        uls = self.cfg.uls
        gen = user_generator(self.cfg.run.seed, server_round, int(u))
        examples = cap_examples(self.worker.store.train_examples(int(u)), uls.max_examples_per_user, gen)
        batches = local_batches(len(examples), uls.batch_size, uls.local_epochs, uls.local_steps, gen)
        if len(batches) != 1:
            return None
        return [examples[i] for i in batches[0]]

    def train_users(self, user_ids, global_flat: torch.Tensor, server_round: int, out, train_one) -> None:
        """Add every user's clipped delta to `out` (a CohortResult); `train_one(out, user,
        global_flat, round)` is the sequential path (one user, failures caught per user), used
        for fallback users and for every user of a grouped pass that raised."""
        task, uls = self.worker.task, self.cfg.uls
        single, multi = [], []
        for u in user_ids:
            try:
                texts = self._plan(u, server_round) if self.grads is not None else None
            except Exception:  # noqa: BLE001 -- the sequential path retries it and counts a failure
                texts = None
            (single if texts is not None else multi).append((int(u), texts))
        for u, _ in multi:  # explicit fallback: the sequential path, counted
            if self.grads is not None and not self._warned_steps:
                log.warning("uls.vectorise: users with other than one local step are trained sequentially")
                self._warned_steps = True
            train_one(out, u, global_flat, server_round)
            out.sequential += 1
        k = max(1, uls.vector_users)
        for i in range(0, len(single), k):
            chunk = single[i : i + k]
            task.flat.set(global_flat)  # every grouped pass runs at the global weights
            try:
                self._chunk(chunk, global_flat, out)
            except Exception as exc:  # noqa: BLE001 -- one user's failure must not drop the group
                log.warning("uls.vectorise: a grouped pass raised (%s); its users are trained one by one", exc)
                for u, _ in chunk:
                    train_one(out, u, global_flat, server_round)
                    out.sequential += 1

    def _chunk(self, chunk, global_flat: torch.Tensor, out) -> None:
        task, clip, lr = self.worker.task, self.cfg.dp.clip_norm, self.cfg.uls.client_lr
        group = max(len(t) for _, t in chunk)
        texts = []
        for _, t in chunk:  # pad each user's rows with empty sequences (no targets, zero gradient)
            texts.extend(t)
            texts.extend([""] * (group - len(t)))
        G, losses = self.grads.per_user(task.batch(texts), len(chunk))
        # delta_u = (w - lr g_u) - w, in the weights' dtype, as the sequential SGD step
        D = torch.add(global_flat, G, alpha=-lr)
        del G
        D.sub_(global_flat)
        finite = torch.isfinite(D).all(1)
        norms = D.pow(2).sum(1, dtype=torch.float64).sqrt()
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        factors = torch.where(finite, factors, torch.zeros_like(factors))
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
            out.num_users += 1
            out.num_examples += len(t)
            out.loss_sum += float(loss)
            out.clipped += int(n > clip)
            out.norms.append(float(n))
            out.vectorised += 1
