"""The privacy ledger: an append-only JSONL file, one line per release (a round or step).

Each line holds the DpEvent of that release, serialised with its class name, so the
run's total event is `ComposedDpEvent([...])` and any accountant can recompute epsilon
from the file alone (`fedsim account RUN_DIR`). A line is written and fsync'ed *before*
the noisy aggregate is applied, so a crash never forgets a release (counted
conservatively).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attr
from dp_accounting import dp_event

from fedsim.errors import FedsimError

_EVENT_TYPES: dict[str, type] = {
    name: cls
    for name, cls in vars(dp_event).items()
    if isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)
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
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        return v

    out = {"type": type(event).__name__}
    for f in attr.fields(type(event)):
        out[f.name] = enc(getattr(event, f.name))
    return out


def event_from_dict(d: dict) -> dp_event.DpEvent:
    def dec(v):
        if isinstance(v, dict) and "type" in v:
            return event_from_dict(v)
        if isinstance(v, list):
            return [dec(x) for x in v]
        return v

    kind = d.get("type")
    cls = _EVENT_TYPES.get(kind)
    if cls is None:  # fedsim's own event modules register on import; load them (a fixed list)
        import importlib

        for mod in _EVENT_MODULES:
            importlib.import_module(mod)
        cls = _EVENT_TYPES.get(kind)
    if cls is None:  # never import by name: the registry is the whitelist
        raise FedsimError(f"unknown privacy event type {kind!r} in ledger")
    kwargs = {k: dec(v) for k, v in d.items() if k != "type"}
    return cls(**kwargs)


def compress(events: list[dp_event.DpEvent]) -> dp_event.DpEvent:
    """The composition of `events`, runs of identical events as SelfComposedDpEvents (fast PLD/RDP)."""
    runs: list[list] = []
    for ev in events:
        if runs and runs[-1][0] == ev:
            runs[-1][1] += 1
        else:
            runs.append([ev, 1])
    parts = [dp_event.SelfComposedDpEvent(ev, n) if n > 1 else ev for ev, n in runs]
    if not parts:
        return dp_event.NoOpDpEvent()
    return parts[0] if len(parts) == 1 else dp_event.ComposedDpEvent(parts)


class PrivacyLedger:
    """Append-only record of releases. `path=None` keeps it in memory (tests, planning)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.entries: list[dict] = []
        self._steps: set[tuple[int, str]] = set()  # (step, event JSON) of every entry, for `has`
        if self.path is not None and self.path.exists():
            for entry in self.read(self.path):
                self._append(entry)

    def _append(self, entry: dict) -> None:
        self.entries.append(entry)
        self._steps.add((int(entry["step"]), json.dumps(entry["event"], sort_keys=True)))

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        entries = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    # A torn last line from a crash mid-write: the release may have
                    # happened, so count it conservatively by keeping the previous
                    # event shape if we can; otherwise refuse.
                    raise FedsimError(f"{path}:{lineno}: corrupt ledger line ({exc.msg})") from None
        return entries

    def record(self, step: int, event: dp_event.DpEvent, *, replay_identical: bool = False, **info) -> bool:
        """Append a release; returns False when it was not appended.

        `replay_identical=True` says the caller re-draws exactly the randomness of an
        earlier attempt at this step (reproducible mode after a resume): the release is
        then bit-identical to the one already recorded and costs no further privacy.
        In every other case a re-done step is recorded again (counted twice: conservative).
        """
        if replay_identical and self.has(step, event):
            return False
        ev = event_to_dict(event)
        entry = {"step": int(step), "event": ev, **info}
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
        """Every recorded release, in order (an entry's event is deserialised once per run of
        identical lines: DpEvents compare by value)."""
        out, last = [], None
        for e in self.entries:
            if not (out and e["event"] == last):
                out.append(event_from_dict(e["event"]))
                last = e["event"]
            else:
                out.append(out[-1])
        return out

    def total_event(self) -> dp_event.DpEvent:
        """The composition of every recorded release, runs of identical events as
        `SelfComposedDpEvent`s: what the run's budget composed, in the same order."""
        return compress(self.events())

    def __len__(self) -> int:
        return len(self.entries)
