"""The UserStore interface: who the users are and what examples each holds.

A store never has to load a whole large population into memory: `train_examples(u)` and
`test_examples(u)` are answered per user (lazily for synthetic and file stores). Examples are
strings for language tasks (tokenised by the task) or arrays for the mean-estimation task.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np


class UserStore(abc.ABC):
    """A population of users, indexed 0..num_users-1."""

    @property
    @abc.abstractmethod
    def num_users(self) -> int: ...

    @abc.abstractmethod
    def train_examples(self, user: int) -> Sequence:
        """The user's private training examples."""

    @abc.abstractmethod
    def test_examples(self, user: int) -> Sequence:
        """The user's held-out examples (evaluation only)."""

    def example_counts(self):
        """Examples (train + test) of every user (int64 array, length num_users). Generic fallback: asks every
        user (O(N) Python calls); large stores override it with a vectorised count that generates no examples."""
        return np.fromiter((len(self.train_examples(u)) + len(self.test_examples(u)) for u in range(self.num_users)),
                           dtype=np.int64, count=self.num_users)

    def train_example_counts(self):
        """Training examples of every user (int64 numpy array); generic fallback as above."""
        return np.fromiter((len(self.train_examples(u)) for u in range(self.num_users)), np.int64, self.num_users)

    def user_name(self, user: int) -> str:
        return str(user)

    def public_examples(self) -> Sequence:
        """Public data (not owned by any user) for pre-training; may be empty."""
        return []

    def _check_user(self, user: int) -> int:
        user = int(user)
        if not 0 <= user < self.num_users:
            raise IndexError(f"user {user} is outside 0..{self.num_users - 1}")
        return user
