"""Canary users for the privacy audit: who they are, what they contribute, and whether they are in.

An audit appends m canary users to the n real users of a store (`CanaryStore`): user ids
n .. n+m-1. Each canary is *included* by a secret fair coin (`Canaries.inclusion`, drawn from the
run's `SecretRandomness`, purpose ``audit-inclusion``); an excluded canary is absent: it is never
sent to a client and none of its examples joins a batch, exactly as if it were not in the
population. (Every canary still has its own Poisson sampling word, so the population the sampler
sees, N = n + m, is public and fixed.)

Two kinds (``audit.kind``):

* ``gradient`` (white-box, Andrew et al. 2024, arXiv 2302.03098): canary j's raw contribution is
  a fixed random unit direction c_j times ``audit.canary_norm`` x C. In ULS it is the user's model
  delta; in ELS every one of the canary user's k examples has per-example gradient -c_j x norm
  (the update, minus the gradient, then points along +c_j), so the canary *user* moves the release
  by up to k C in one direction: the worst case the user-level accountant covers. Clipping runs on
  the raw contribution as on any user's, so a raw norm above C tests the clipping too.
* ``text`` (black-box, Carlini et al. 2019, "The Secret Sharer"): canary j holds k copies of a
  secret random sequence and trains on them like any user; it is scored by how much more likely
  the final model finds its sequence (exposure against random reference sequences).

The directions and sequences are a public function of ``audit.seed`` (the auditor knows them);
only the coins are secret. Canaries hold no held-out examples, so the evaluation set, and with it
every real user's metric, is the same as without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.data.base import UserStore

#: the fixed prefix of a text canary; the secret is the digits after it
TEXT_PREFIX = "my secret code is "
TEXT_DIGITS = 12


@dataclass(frozen=True)
class Canaries:
    """m canaries appended after `num_real` real users; each holds `examples` examples."""

    num_real: int
    count: int
    kind: str  # "gradient" | "text"
    norm: float  # a gradient canary's raw norm in multiples of C
    seed: int
    examples: int  # examples per canary user (els.k: the user-level group size)

    @classmethod
    def from_config(cls, cfg, num_real: int) -> Canaries:
        a = cfg.audit
        return cls(num_real=int(num_real), count=int(a.canaries), kind=a.kind, norm=float(a.canary_norm),
                   seed=int(a.seed), examples=int(cfg.els.k))

    # -- who --------------------------------------------------------------------------------------
    def index(self, users: np.ndarray) -> np.ndarray:
        """Canary index j of each user id (-1 for a real user)."""
        users = np.asarray(users, dtype=np.int64)
        return np.where(users >= self.num_real, users - self.num_real, -1)

    def inclusion(self, randomness) -> np.ndarray:
        """The secret coins: canary j is in the population iff included[j] (fair, independent:
        the top bit of one keystream word each, `SecretRandomness` purpose ``audit-inclusion``)."""
        words = randomness.stream("audit-inclusion", 0).words(self.count)
        return (words >> np.uint64(63)).astype(bool)

    def present(self, users: np.ndarray, included: np.ndarray) -> np.ndarray:
        """`users` without the excluded canaries (order kept)."""
        users = np.asarray(users, dtype=np.int64)
        j = self.index(users)
        keep = (j < 0) | included[np.maximum(j, 0)]
        return users[keep]

    # -- what -------------------------------------------------------------------------------------
    def direction(self, j: int, dimension: int) -> torch.Tensor:
        """Canary j's unit direction in R^d (float32): a Gaussian vector, normalised, from a
        generator seeded by (audit.seed, j): isotropic, and the same in every process."""
        g = torch.Generator().manual_seed(_mix(self.seed, 1, int(j)))
        v = torch.randn(int(dimension), generator=g, dtype=torch.float64)
        return v.div_(v.norm()).float()

    def directions(self, dimension: int, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows j = first..stop-1 of the canaries' directions, [rows, d] float32."""
        stop = self.count if stop is None else stop
        return torch.stack([self.direction(j, dimension) for j in range(first, stop)]) if stop > first else \
            torch.zeros(0, int(dimension))

    def raw_update(self, j: int, dimension: int, clip_norm: float) -> torch.Tensor:
        """A gradient canary's contribution before clipping: c_j x audit.canary_norm x C."""
        return self.direction(j, dimension).mul_(self.norm * clip_norm)

    def clipped_update(self, j: int, dimension: int, clip_norm: float, sign: float = 1.0) -> torch.Tensor:
        """sign x the raw contribution, clipped to C by the factor every user and example gets
        (`clip_factor`): what a gradient canary adds to the sum."""
        from fedsim.privacy.clipping import clip_factor, update_norm

        g = self.raw_update(j, dimension, clip_norm).mul_(sign)
        return g.mul_(clip_factor(update_norm(g), clip_norm))

    def text(self, j: int) -> str:
        """Canary j's secret sequence."""
        return _secret_text(np.random.default_rng([self.seed, 2, int(j)]))

    def reference_texts(self, n: int) -> list[str]:
        """n random sequences from the canaries' distribution, never trained on (exposure's reference set)."""
        rng = np.random.default_rng([self.seed, 3])
        return [_secret_text(rng) for _ in range(int(n))]

    def describe(self) -> dict:
        return {"canaries": self.count, "kind": self.kind, "canary_norm": self.norm, "seed": self.seed,
                "examples_per_canary": self.examples, "first_canary_user": self.num_real}


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (a public, fixed derivation)."""
    import hashlib

    h = hashlib.sha256(b"fedsim audit canary" + b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts))
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _secret_text(rng: np.random.Generator) -> str:
    return TEXT_PREFIX + "".join(str(d) for d in rng.integers(0, 10, TEXT_DIGITS))


class CanaryStore(UserStore):
    """A store's users followed by the audit's canary users (ids num_real .. num_real + m - 1)."""

    def __init__(self, base: UserStore, canaries: Canaries):
        if canaries.num_real != base.num_users:
            raise ValueError("the canaries were built for another population")
        self.base, self.canaries = base, canaries

    @property
    def num_users(self) -> int:
        return self.base.num_users + self.canaries.count

    def train_examples(self, user: int) -> Sequence:
        user = self._check_user(user)
        if user < self.base.num_users:
            return self.base.train_examples(user)
        c = self.canaries
        # a gradient canary's examples are placeholders: its contribution is injected, never trained
        return [c.text(user - c.num_real) if c.kind == "text" else ""] * c.examples

    def test_examples(self, user: int) -> Sequence:
        user = self._check_user(user)
        return self.base.test_examples(user) if user < self.base.num_users else []

    def example_counts(self):
        return np.concatenate([self.base.example_counts(), np.full(self.canaries.count, self.canaries.examples)])

    def train_example_counts(self):
        return np.concatenate([self.base.train_example_counts(),
                               np.full(self.canaries.count, self.canaries.examples, dtype=np.int64)])

    def user_name(self, user: int) -> str:
        return self.base.user_name(user) if user < self.base.num_users else f"canary-{user - self.base.num_users}"

    def public_examples(self) -> Sequence:
        return self.base.public_examples()

    def data_report(self) -> dict:
        return self.base.data_report()


def with_canaries(store: UserStore, cfg) -> UserStore:
    """The store with the audit's canaries appended when `audit.canaries` > 0 (else `store`)."""
    if not cfg.audit.canaries:
        return store
    return CanaryStore(store, Canaries.from_config(cfg, store.num_users))


def canaries_of(store) -> Canaries | None:
    return store.canaries if isinstance(store, CanaryStore) else None


def real_users(store: UserStore) -> UserStore:
    """The store without its canaries (the evaluation set is drawn from it: canaries never
    change it, whatever the population size)."""
    return store.base if isinstance(store, CanaryStore) else store


def refuse_canaries(cfg, command: str) -> None:
    """A canary changes the population: only `fedsim audit` may add them (checked before anything
    is written)."""
    if cfg.audit.canaries:
        from fedsim.errors import ConfigError

        raise ConfigError(f"audit.canaries={cfg.audit.canaries}: canary users are inserted only by `fedsim audit`"
                          f" (set audit.canaries=0 to {command})")


def sequence_losses(task, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Each text's mean next-token loss under the task's model (no gradients)."""
    from fedsim.training.per_example import per_example_losses

    out = []
    task.model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                b = task.batch(texts[i:i + batch_size])
                logits = task.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                out.append(per_example_losses(logits, b["labels"]).double().cpu().numpy())
    finally:
        task.model.train()
    return np.concatenate(out) if out else np.zeros(0)
