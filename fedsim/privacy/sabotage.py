"""Deliberately broken mechanisms, for testing the privacy audit (`fedsim audit`) and nothing else.

An audit that never fails proves nothing: `tests/test_audit.py` switches one of these on, runs an
audit, and checks that the audit flags the run. No config key, CLI option or environment variable
reaches them; only Python code that calls `sabotaged(...)` does, and only in its own process (the
in-process backend: a Ray worker never sees the switch, so `fedsim.audit` refuses to combine them).
Every run that happens under a switch says so in its `audit.json` (`sabotage`).

The switches, and where each one bites:

* ``no-clip``      `clip_factor` / `clip_factors` return 1 (updates and per-example gradients
                   are summed unclipped) and the server stops dropping replies whose norm exceeds
                   their users' clip bound (`UlsStrategy._reply_sum`);
* ``weak-noise``   `NoiseMechanism.add_noise` draws noise 10x smaller while every record (ledger,
                   metrics, summary) still states the calibrated std;
* ``reused-noise`` `SecretRandomness.stream` gives every round/step of a ``*-noise`` purpose the
                   keystream of step 0: one noise vector, added again and again.

The fourth broken mechanism of the audit's self-test, a sampling key the auditor knows, needs no
switch: it is `dp.reproducible: true` (the key is a public function of run.seed) with an auditor
that regenerates the cohorts (`fedsim.audit`'s `cohort-known` statistic).
"""

from __future__ import annotations

import contextlib

KINDS = ("no-clip", "weak-noise", "reused-noise")
#: how much smaller the noise is under ``weak-noise``
WEAK_NOISE_FACTOR = 10.0

_active: set[str] = set()


def active(kind: str) -> bool:
    """Whether the named switch is on in this process (cheap: called per clip and per draw)."""
    return bool(_active) and kind in _active


def active_kinds() -> list[str]:
    return sorted(_active)


@contextlib.contextmanager
def sabotaged(*kinds: str):
    """Break the mechanism as named for the duration of the block (tests only)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown sabotage {unknown}; known: {', '.join(KINDS)}")
    before = set(_active)
    _active.update(kinds)
    try:
        yield
    finally:
        _active.clear()
        _active.update(before)
