"""Synthetic token users, generated lazily from (seed, user id): nothing per user is stored.

A population of N users (10^6 and more) costs a few hundred kilobytes: a shared vocabulary and its global
word distribution. Everything about user u is recomputed from (seed, u) when asked:

- **How many examples** u holds: a discrete Pareto (power law) draw, ``n_u = min(cap, floor(m * U^(-1/alpha)))``
  with ``U`` uniform in (0, 1] from a splitmix64 hash of (seed, u), ``m = min_examples`` (so no user has
  fewer) and ``cap = max_examples``. ``P(n_u >= k) = (m / k)^alpha`` below the cap: with the defaults (m=1,
  alpha=1.2, cap=1000) the median is 1-2 examples, the mean ~4 and ~0.4% of users hold 100 or more. The
  hash is vectorised (`example_counts`), so totals over a population need no per-user generator.
- **What u writes**: a mixture of the global word distribution (Zipf over a seeded 4096-word vocabulary)
  and a user-specific one (``topics`` words with Dirichlet weights), mixed with a user-specific weight
  ``lam_u ~ Uniform(0.3, 0.9)``. The user's word stream is joined with spaces and cut into examples of
  exactly ``seq_len`` bytes (ASCII), like LEAF's fixed-length character windows.
- **Train / test split**: the last ``split_test_count(n_u, test_fraction)`` examples are held out (none
  when the user has a single example), deterministically.

Per-user randomness comes from ``numpy.random.default_rng([seed, user, 1])`` (a SeedSequence hash of the
pair), so user u's examples do not depend on which other users were generated before, nor on the order of
calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from fedsim.data.base import UserStore

_MASK64 = (1 << 64) - 1
_LETTERS = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)


def split_test_count(n: int, test_fraction: float) -> int:
    """Held-out examples of a user with n examples: round(n * f), at least 1 and at most
    n - 1 when n >= 2 (every user keeps a training example); 0 when n < 2 or f == 0."""
    if n < 2 or test_fraction <= 0:
        return 0
    return min(n - 1, max(1, round(n * test_fraction)))


def split_test_counts(n: np.ndarray, test_fraction: float) -> np.ndarray:
    """`split_test_count` over an array of per-user example counts (vectorised; equal element-wise)."""
    n = np.asarray(n, dtype=np.int64)
    if test_fraction <= 0:
        return np.zeros_like(n)
    k = np.minimum(n - 1, np.maximum(1, np.round(n * float(test_fraction)).astype(np.int64)))
    return np.where(n < 2, 0, k)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SyntheticTokenStore(UserStore):
    """N lazily generated text users with power-law example counts and per-user word mixes.

    ``examples_per_user`` fixes every user's count (train + test) instead of the power law. ``public_examples``
    > 0 makes `public_examples()` return that many sequences from the global distribution alone (public
    pre-training data that belongs to no user)."""

    VOCAB_SIZE = 4096

    def __init__(self, num_users: int, seed: int = 0, *, seq_len: int = 64, test_fraction: float = 0.2,
                 min_examples: int = 1, max_examples: int = 1000, alpha: float = 1.2,
                 examples_per_user: int | None = None, topics: int = 32, zipf_s: float = 1.1,
                 public_examples: int = 0, cache_users: int = 4, population: int | None = None):
        for bad, message in (
                (num_users < 1, f"num_users must be >= 1, got {num_users}"),
                (seq_len < 1, f"seq_len must be >= 1, got {seq_len}"),
                (not 0 <= test_fraction < 1, f"test_fraction must be in [0, 1), got {test_fraction}"),
                (min_examples < 1 or max_examples < min_examples,
                 f"need 1 <= min_examples <= max_examples, got {min_examples}, {max_examples}"),
                (alpha <= 0, f"alpha must be > 0, got {alpha}"),
                (examples_per_user is not None and examples_per_user < 1,
                 f"examples_per_user must be >= 1, got {examples_per_user}"),
                (topics < 1, f"topics must be >= 1, got {topics}")):
            if bad:
                raise ValueError(message)
        self._n, self.seed, self.seq_len, self.topics = int(num_users), int(seed), int(seq_len), int(topics)
        self.test_fraction, self.alpha = float(test_fraction), float(alpha)
        self.min_examples, self.max_examples = int(min_examples), int(max_examples)
        self.examples_per_user = None if examples_per_user is None else int(examples_per_user)
        self.num_public, self._cache_size = int(public_examples), int(cache_users)
        self.population = self._n if population is None else int(population)  # the configured users, >= num_users
        self._seed64 = self.seed & _MASK64
        self._key = _splitmix64(np.array([self._seed64], dtype=np.uint64))[0]
        # the only population-independent state: a seeded vocabulary and its Zipf weights
        rng = np.random.default_rng([self._seed64, 0xC0FFEE])
        lengths = np.minimum(1 + rng.geometric(0.25, size=self.VOCAB_SIZE), 12)
        letter_p = 1.0 / np.arange(1, _LETTERS.size + 1) ** 0.9
        letters = rng.choice(_LETTERS, size=int(lengths.sum()), p=letter_p / letter_p.sum()).tobytes().decode("ascii")
        ends = np.cumsum(lengths).tolist()
        self._words = np.array([letters[e - n:e] for e, n in zip(ends, lengths.tolist())], dtype=object)
        weights = 1.0 / np.arange(1, self.VOCAB_SIZE + 1) ** zipf_s
        weights = weights[rng.permutation(self.VOCAB_SIZE)]  # word rank is not alphabetical or by length
        self._global_cdf = np.cumsum(weights / weights.sum())
        self._avg_word_bytes = float((weights / weights.sum()) @ lengths) + 1.0
        self._cache: OrderedDict[int, list[str]] = OrderedDict()

    @classmethod
    def benchmark(cls, num_users: int = 2000, seed: int = 0, **kw) -> SyntheticTokenStore:
        """The shared benchmark workload: each user holds 8 training sequences of 64 bytes
        (plus 2 held out) from its own word distribution."""
        return cls(num_users, seed, **{"seq_len": 64, "examples_per_user": 10, "test_fraction": 0.2, **kw})

    @property
    def num_users(self) -> int:
        return self._n

    def example_counts(self, users: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Examples (train + test) of each given user (default: all users; 8 bytes per user)."""
        u = np.arange(self._n, dtype=np.uint64) if users is None else np.asarray(users).astype(np.uint64)
        if self.examples_per_user is not None:
            return np.full(u.shape, self.examples_per_user, dtype=np.int64)
        h = _splitmix64(u ^ self._key)
        unif = ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # in (0, 1)
        with np.errstate(over="ignore"):
            n = np.floor(self.min_examples * unif ** (-1.0 / self.alpha))
        return np.minimum(n, self.max_examples).astype(np.int64)

    def num_examples(self, user: int) -> int:
        return int(self.example_counts([self._check_user(user)])[0])

    def train_example_counts(self, users: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Training examples of each given user (default: all), vectorised like `example_counts`."""
        n = self.example_counts(users)
        return n - split_test_counts(n, self.test_fraction)

    def total_examples(self, chunk: int = 1 << 20) -> int:
        """Sum of all users' example counts, in chunks (memory O(chunk))."""
        return sum(int(self.example_counts(np.arange(start, min(self._n, start + chunk))).sum())
                   for start in range(0, self._n, chunk))

    def _sample_examples(self, rng: np.random.Generator, n: int, topic_ids=None, topic_cdf=None, lam=0.0) -> list[str]:
        """n examples of seq_len bytes cut from one word stream; without topics, global words only."""
        nbytes, parts, have = n * self.seq_len, [], 0
        while have < nbytes:
            m = int((nbytes - have) / self._avg_word_bytes * 1.25) + 8
            ids = np.searchsorted(self._global_cdf, rng.random(m), side="right")
            if topic_ids is not None:
                mine = rng.random(m) < lam
                pick = np.searchsorted(topic_cdf, rng.random(int(mine.sum())), side="right")
                ids[mine] = topic_ids[np.minimum(pick, topic_ids.size - 1)]
            text = " ".join(self._words[np.minimum(ids, self.VOCAB_SIZE - 1)].tolist()) + " "
            parts.append(text)
            have += len(text)
        stream, L = "".join(parts), self.seq_len
        return [stream[i * L:(i + 1) * L] for i in range(n)]

    def _mixture(self, user: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray, float]:
        """The user's generator, then what it draws first: topic word ids, their weights and lam."""
        rng = np.random.default_rng([self._seed64, user, 1])
        topic_ids = rng.integers(0, self.VOCAB_SIZE, size=self.topics)
        weights = rng.dirichlet(np.full(self.topics, 0.5))
        return rng, topic_ids, weights, float(rng.uniform(0.3, 0.9))

    def _generate(self, user: int) -> list[str]:
        if user in self._cache:
            self._cache.move_to_end(user)
            return self._cache[user]
        rng, topic_ids, weights, lam = self._mixture(user)
        cdf = np.cumsum(weights)
        examples = self._sample_examples(rng, self.num_examples(user), topic_ids, cdf / cdf[-1], lam)
        if self._cache_size > 0:
            self._cache[user] = examples
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return examples

    def train_examples(self, user: int) -> list[str]:
        ex = self._generate(self._check_user(user))
        return ex[:len(ex) - split_test_count(len(ex), self.test_fraction)]

    def test_examples(self, user: int) -> list[str]:
        ex = self._generate(self._check_user(user))
        return ex[len(ex) - split_test_count(len(ex), self.test_fraction):]

    def user_name(self, user: int) -> str:
        return f"synthetic-{self._check_user(user)}"

    def user_mixture(self, user: int) -> dict:
        """The user's text distribution, for inspection and tests: topic words, their weights and the
        mixing weight of the user-specific part."""
        _, topic_ids, weights, lam = self._mixture(self._check_user(user))
        return {"topic_words": self._words[topic_ids].tolist(), "weights": weights.tolist(), "lam": lam}

    def data_report(self) -> dict:
        """Users beyond max_users, counted without generating them (their examples are not counted: that would
        visit every one of a large population). No user is below min_examples: it is the power law's floor."""
        if self.population <= self._n:
            return {}
        return {"source": "synthetic", "users_beyond_max_users": self.population - self._n, "max_users": self._n,
                "users": self._n}

    def public_examples(self) -> list[str]:
        return self._sample_examples(np.random.default_rng([self._seed64, 0xB0B11C]), self.num_public)
