"""Poisson sampling: each of N members (users for ULS, kept examples for ELS) joins a
round independently with probability q.

The draw is secret: its bits come from `SecretRandomness.stream(purpose, step)`
(`fedsim/privacy/randomness.py`), keyed from OS entropy unless `dp.reproducible`.
Member i joins iff its 64-bit keystream word is below floor(q 2^64): an exact
Bernoulli(q' <= q). Cost: N words (8 bytes each, ~2 ns) per round, in fixed-size chunks,
so memory stays flat in the population (10^6 users: ~3 ms a round).
"""

from __future__ import annotations

import numpy as np

from fedsim.privacy.accounting import check_sampling_rate
from fedsim.privacy.randomness import SecretRandomness


class PoissonSampler:
    """Poisson(q) samples of range(num_members), one per step, from the secret source."""

    def __init__(self, num_members: int, q: float, randomness: SecretRandomness, purpose: str):
        if num_members < 1:
            raise ValueError(f"the population must have >= 1 member, got {num_members}")
        check_sampling_rate(q, "sampling rate q")
        self.num_members, self.q = int(num_members), float(q)
        self.randomness, self.purpose = randomness, purpose

    def sample(self, step: int) -> np.ndarray:
        """Sorted member ids of step `step`'s sample (possibly empty). A pure function of the
        key and the step: a reproducible resume re-draws the same sample, a secure resume
        (a new key) a fresh one."""
        return self.randomness.stream(self.purpose, step).bernoulli_indices(self.num_members, self.q)
