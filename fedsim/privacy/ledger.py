"""The privacy ledger: an append-only JSONL file, one line per release (a round or step).

Each line holds the DpEvent of that release, serialised with its class name, so the run's
total event is `ComposedDpEvent([...])` and any accountant can recompute epsilon from the
file alone (`fedsim account RUN_DIR`). A line is written and fsync'ed *before* the noisy
aggregate is applied, so a crash never forgets a release (counted conservatively).
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
from pathlib import Path

import attr
from dp_accounting import dp_event

from fedsim.errors import FedsimError

#: the events the ledger (de)serialises, by class name: a whitelist, never an import by name
_EVENT_TYPES: dict[str, type] = {
    name: cls for name, cls in vars(dp_event).items() if isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)
}
#: fedsim modules that define (and register) DpEvents of their own; imported on first need.
_EVENT_MODULES = ("fedsim.privacy.lmo.faithful",)


def register_event_type(cls: type) -> type:
    """Let the ledger (de)serialise a DpEvent defined outside dp_accounting (e.g. LMO)."""
    _EVENT_TYPES[cls.__name__] = cls
    return cls


def event_to_dict(event: dp_event.DpEvent) -> dict:
    def enc(v):
        if isinstance(v, dp_event.DpEvent):
            return event_to_dict(v)
        return [enc(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {"type": type(event).__name__, **{f.name: enc(getattr(event, f.name)) for f in attr.fields(type(event))}}


def event_from_dict(d: dict) -> dp_event.DpEvent:
    def dec(v):
        if isinstance(v, dict) and "type" in v:
            return event_from_dict(v)
        return [dec(x) for x in v] if isinstance(v, list) else v

    kind = d.get("type")
    if kind not in _EVENT_TYPES:  # fedsim's own event modules register on import (a fixed list)
        for mod in _EVENT_MODULES:
            importlib.import_module(mod)
    if kind not in _EVENT_TYPES:
        raise FedsimError(f"unknown privacy event type {kind!r} in ledger")
    return _EVENT_TYPES[kind](**{k: dec(v) for k, v in d.items() if k != "type"})


class WorstGroup:
    """Which releases add to the composition when each user belongs to one fixed participation
    group and a release (a ledger entry with a "group") touches only that group's users (banded
    MF's cyclic Poisson sampling, `fedsim/privacy/banded_mf.py`).

    A user's privacy loss composes the releases of its own group only, so the run's epsilon is the
    worst group's. Kept as one composition: for each event, as many copies as the group with the
    most of them holds (an upper bound on every group's composition; exact when, as in a run, all
    grouped events are equal). A release without a group touches everyone and always adds.

    Counts are kept per partition (`groups`, the number of groups) as well as per event: group 1 of
    3 and group 1 of 2 are different sets of users, and a user's loss adds the worst group of each
    partition (a run resumed after its config changed the bands while keeping p = b q, hence the
    event: bands 3 -> 2 after round 7 puts user 3 in 3 + 1 releases, while counting group indices
    across both partitions gave 3)."""

    def __init__(self):
        self._count: dict[tuple[int, str], int] = {}
        self._max: dict[str, int] = {}

    @staticmethod
    def _key(event: dp_event.DpEvent, groups: int | None = None) -> str:
        return json.dumps({"event": event_to_dict(event), "groups": groups}, sort_keys=True)

    def adds(self, event: dp_event.DpEvent, group: int | None, groups: int | None = None) -> bool:
        """Whether one more release of `event` on `group` (of `groups`) raises the composition (nothing changes)."""
        if group is None:
            return True
        key = self._key(event, groups)
        return self._count.get((int(group), key), 0) + 1 > self._max.get(key, 0)

    def add(self, event: dp_event.DpEvent, group: int | None, groups: int | None = None) -> bool:
        """Count the release; True if it adds to the composition."""
        if group is None:
            return True
        key = self._key(event, groups)
        n = self._count[(int(group), key)] = self._count.get((int(group), key), 0) + 1
        if n > self._max.get(key, 0):
            self._max[key] = n
            return True
        return False


def compress(events: list[dp_event.DpEvent]) -> dp_event.DpEvent:
    """The composition of `events`, runs of identical events as SelfComposedDpEvents (fast PLD/RDP)."""
    runs = [(ev, sum(1 for _ in run)) for ev, run in itertools.groupby(events)]
    parts = [dp_event.SelfComposedDpEvent(ev, n) if n > 1 else ev for ev, n in runs]
    if len(parts) == 1:
        return parts[0]
    return dp_event.ComposedDpEvent(parts) if parts else dp_event.NoOpDpEvent()


class PrivacyLedger:
    """Append-only record of releases. `path=None` keeps it in memory (tests, planning)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.entries: list[dict] = []
        self._steps: set[tuple[int, str]] = set()  # (step, event JSON) of every entry, for `has`
        if self.path is not None and self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    try:
                        if line.strip():
                            self._append(json.loads(line))
                    except json.JSONDecodeError as exc:  # e.g. torn by a crash: the release may have happened
                        raise FedsimError(f"{self.path}:{lineno}: corrupt ledger line ({exc.msg})") from None

    def _append(self, entry: dict) -> None:
        self.entries.append(entry)
        self._steps.add((int(entry["step"]), json.dumps(entry["event"], sort_keys=True)))

    def record(self, step: int, event: dp_event.DpEvent, *, replay_identical: bool = False, **info) -> bool:
        """Append a release; False if not appended: `replay_identical=True` says the caller re-draws
        exactly the randomness of an earlier attempt at this step (reproducible mode after a resume),
        so the release is bit-identical to the recorded one and costs no further privacy. Any other
        re-done step is recorded again (counted twice: conservative)."""
        if replay_identical and self.has(step, event):
            return False
        entry = {"step": int(step), "event": event_to_dict(event), **info}
        self._append(entry)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        return True

    def has(self, step: int, event: dp_event.DpEvent) -> bool:
        return (int(step), json.dumps(event_to_dict(event), sort_keys=True)) in self._steps

    def events(self) -> list[dp_event.DpEvent]:
        """Every recorded release, in order (deserialised once per run of identical lines:
        DpEvents compare by value)."""
        out, prev = [], None
        for e in self.entries:
            out.append(out[-1] if out and e["event"] == prev else event_from_dict(e["event"]))
            prev = e["event"]
        return out

    def groups(self) -> list[int | None]:
        """Each entry's participation group (None: a release that touches every user)."""
        return [e.get("group") for e in self.entries]

    def partitions(self) -> list[int | None]:
        """Each entry's number of participation groups (None without groups)."""
        return [e.get("groups") for e in self.entries]

    def total_event(self) -> dp_event.DpEvent:
        """The composition of every recorded release, runs of identical events as
        `SelfComposedDpEvent`s: what the run's budget composed, in the same order. Releases
        recorded with a participation group count for the worst group only (`WorstGroup`)."""
        worst = WorstGroup()
        return compress([ev for ev, g, n in zip(self.events(), self.groups(), self.partitions()) if worst.add(ev, g, n)])

    def __len__(self) -> int:
        return len(self.entries)
