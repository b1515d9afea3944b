"""A cohort worker: trains users from the same global weights and returns the sum of their
individually clipped deltas (docs/architecture.md, "One ULS round"), so the sum has sensitivity C
as in the one-user-per-client path. That must hold under failure too: a user whose training raises,
or whose delta is not finite, is left out (a zero contribution) and counted; the others' deltas
are still returned. Dropping the whole message instead would let one user's data remove
`users_per_client` users' contributions, a change of up to users_per_client * C.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from fedsim.privacy.clipping import clip_factor, update_norm
from fedsim.training.local import train_user, user_generator

log = logging.getLogger("fedsim")


@dataclass
class CohortResult:
    delta_sum: torch.Tensor
    clip_norm: float  # the C every delta in the sum was clipped to
    num_users: int = 0  # users whose clipped delta is in the sum
    num_examples: int = 0
    loss_sum: float = 0.0
    clipped: int = 0  # users whose delta norm exceeded C
    failed: int = 0  # users left out (training raised, or a non-finite delta)
    norms: list[float] = field(default_factory=list)
    canaries: int = 0  # audit canaries whose clipped contribution is in the sum (never counted as users)
    vectorised: int = 0  # uls.vectorise: users trained in a grouped forward/backward
    sequential: int = 0  # uls.vectorise: users that fell back to the back-to-back path

    def add_user(self, norm: float, num_examples: int, loss: float, clip: float) -> None:
        """Count a user whose clipped delta is in `delta_sum`."""
        self.num_users += 1
        self.num_examples += num_examples
        self.loss_sum += loss
        self.clipped += int(norm > clip)
        self.norms.append(norm)


class CohortWorker:
    """Holds one task (model built once per process) and one user store."""

    def __init__(self, task, store, cfg):
        from fedsim.auditing.canaries import canaries_of

        self.task, self.store, self.cfg = task, store, cfg
        self.canaries = canaries_of(store)  # `fedsim audit`: users from canaries.num_real on are canaries
        self._vectorised = None  # uls.vectorise: built on first use (fedsim/training/vectorised.py)

    def train_users(self, user_ids, global_flat: torch.Tensor, server_round: int,
                    clip_norm: float | None = None) -> CohortResult:
        """Each user's delta clipped to `clip_norm` (the server's C for this round; None: dp.clip_norm), summed."""
        global_flat = global_flat.to(self.task.flat.flat.device, self.task.flat.flat.dtype)
        out = CohortResult(delta_sum=torch.zeros_like(global_flat),
                           clip_norm=self.cfg.dp.clip_norm if clip_norm is None else float(clip_norm))
        if self.canaries is not None:
            user_ids = [int(u) for u in user_ids]
            for u in (u for u in user_ids if u >= self.canaries.num_real):
                self.add_canary(out, u, global_flat, server_round)
            user_ids = [u for u in user_ids if u < self.canaries.num_real]
        if getattr(self.cfg.uls, "vectorise", False):
            if self._vectorised is None:
                from fedsim.training.vectorised import VectorisedUsers

                self._vectorised = VectorisedUsers(self)
            self._vectorised.train_users(user_ids, global_flat, server_round, out, self.train_one)
            return out
        for u in user_ids:
            self.train_one(out, int(u), global_flat, server_round)
        return out

    def add_canary(self, out: CohortResult, user: int, global_flat: torch.Tensor, server_round: int) -> None:
        """An audit canary's contribution, clipped like any user's (fedsim/auditing/canaries.py): a
        gradient canary's raw update is its direction; a text canary trains on its sequence."""
        c, clip = self.canaries, out.clip_norm
        if c.kind == "gradient":
            delta = c.raw_update(user - c.num_real, global_flat.numel(), clip).to(global_flat.device, global_flat.dtype)
        else:
            gen = user_generator(self.cfg.run.seed, server_round, user)
            delta = train_user(self.task, global_flat, self.store.train_examples(user), self.cfg.uls, gen).delta
        norm = update_norm(delta)
        if math.isfinite(norm):
            out.delta_sum.add_(delta, alpha=clip_factor(norm, clip))
            out.canaries += 1

    def train_one(self, out: CohortResult, user: int, global_flat: torch.Tensor, server_round: int) -> None:
        """Train one user and add its clipped delta to `out`; a failing user is left out and counted."""
        try:
            gen = user_generator(self.cfg.run.seed, server_round, user)
            res = train_user(self.task, global_flat, self.store.train_examples(user), self.cfg.uls, gen)
        except Exception as exc:  # noqa: BLE001 -- any per-user failure: drop this user only
            # no user id or message on the console: who was sampled is secret (debug level only)
            log.warning("round %d: a user's training failed (%s); left out of the sum", server_round,
                        type(exc).__name__)
            log.debug("round %d: user %d failed: %s", server_round, user, exc)
            out.failed += 1
            return
        clip = out.clip_norm
        norm = update_norm(res.delta)  # NaN / inf exactly when the delta has a non-finite entry
        if not math.isfinite(norm):
            out.failed += 1
            return
        # clip and accumulate in one pass: sum += min(1, C / (norm + 1e-6)) * delta (per_user_clip's factor)
        out.delta_sum.add_(res.delta, alpha=clip_factor(norm, clip))
        out.add_user(norm, res.num_examples, res.loss, clip)
