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

    def data_report(self) -> dict:
        """What the store left out or changed of its source, and why: counts under the keys `report_notes`
        reads (users below min_examples, empty texts, truncated texts, users beyond max_users), plus the
        users and examples kept. {} when the store knows of nothing left out. Counts of private data: a
        simulation diagnostic, outside the guarantee (like N, which is treated as public)."""
        return {}

    def _check_user(self, user: int) -> int:
        user = int(user)
        if not 0 <= user < self.num_users:
            raise IndexError(f"user {user} is outside 0..{self.num_users - 1}")
        return user


def report_notes(report: dict) -> list[str]:
    """One line per thing a store left out or changed (`UserStore.data_report`), for `note: ...` lines on
    the console; [] when nothing was. A count the store does not know (a lazy population) is left out."""
    def count(n, noun: str) -> str:
        return f"{n:,} {noun}{'' if n == 1 else 's'}"

    def examples(key: str) -> str:
        return f" ({count(report[key], 'example')})" if report.get(key) is not None else ""

    notes = []
    if n := report.get("empty_texts_skipped"):
        notes.append(f"{count(n, 'row')} with an empty or null text skipped")
    if n := report.get("texts_truncated"):
        notes.append(f"{count(n, 'text')} longer than data.max_example_bytes={report['max_example_bytes']:,} bytes"
                     " cut to that length (data.long_examples=truncate)")
    if n := report.get("users_below_min_examples"):
        notes.append(f"{count(n, 'user')} with fewer than data.min_examples={report['min_examples']} examples left"
                     f" out{examples('examples_below_min_examples')}")
    if n := report.get("users_beyond_max_users"):
        notes.append(f"data.max_users={report['max_users']:,}: {count(n, 'more user')} left"
                     f" out{examples('examples_beyond_max_users')}")
    pub = report.get("public") or {}
    if n := pub.get("empty_texts_skipped"):
        notes.append(f"data.public_path: {count(n, 'empty or null text')} skipped")
    if n := pub.get("texts_truncated"):
        notes.append(f"data.public_path: {count(n, 'text')} longer than data.max_example_bytes cut to that length")
    if notes and report.get("users") is not None:
        kept = f"{report['users']:,} users" + (f", {report['examples']:,} examples" if report.get("examples") is not None
                                              else "")
        notes.append(f"kept: {kept}")
    return notes
