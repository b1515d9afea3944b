"""Poisson sampling: each of N members (users for ULS, kept examples for ELS) joins a
round independently with probability q.

The draw is secret: its bits come from `SecretRandomness.stream(purpose, step)`
(`fedsim/privacy/randomness.py`), keyed from OS entropy unless `dp.reproducible`.
Member i joins iff its 64-bit keystream word is below floor(q 2^64): an exact
Bernoulli(q' <= q). Cost: N words (8 bytes each, ~2 ns) per round, in fixed-size chunks,
so memory stays flat in the population (10^6 users: ~3 ms a round).

`CyclicPoissonSampler` (banded MF, `fedsim/privacy/banded_mf.py`): members are split into
`groups` fixed groups by index (i mod groups); step t draws only group (t - 1) mod groups, each
of its members with probability groups x q, from the same keystream: N / groups words a round.
With one group it is `PoissonSampler`, draw for draw.
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


class CyclicPoissonSampler:
    """Cyclic Poisson samples: step t samples only the members i with i mod groups == (t - 1) mod
    groups, each independently with probability p = groups x q (exact, from the secret keystream)."""

    def __init__(self, num_members: int, q: float, groups: int, randomness: SecretRandomness, purpose: str):
        if num_members < 1:
            raise ValueError(f"the population must have >= 1 member, got {num_members}")
        if isinstance(groups, bool) or int(groups) != groups or groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
        self.num_members, self.groups, self.q = int(num_members), int(groups), float(q)
        self.p = self.groups * self.q
        check_sampling_rate(self.p, "in-group sampling rate groups x q")
        self.randomness, self.purpose = randomness, purpose

    def group(self, step: int) -> int:
        return (int(step) - 1) % self.groups

    def sample(self, step: int) -> np.ndarray:
        """Sorted member ids of step `step`'s sample: g + groups x j for the sampled j of group g."""
        g = self.group(step)
        size = max(0, -(-(self.num_members - g) // self.groups))  # |{g, g + groups, ...} below N|
        idx = self.randomness.stream(self.purpose, step).bernoulli_indices(size, self.p)
        return idx * self.groups + g


def participation_sampler(num_members: int, q: float, groups: int, randomness: SecretRandomness, purpose: str):
    """The sampler a mechanism's participation schema needs (`NoiseMechanism.participation_groups`)."""
    if groups == 1:
        return PoissonSampler(num_members, q, randomness, purpose)
    return CyclicPoissonSampler(num_members, q, groups, randomness, purpose)
