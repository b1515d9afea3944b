"""One DP release, as named steps: guard -> record -> noise -> scale.

The training loop calls it for ULS rounds and ELS steps alike (docs/architecture.md):

  guard   what was released plus this release must fit (ε, δ), else BudgetExceededError;
  record  the event is fsync'ed to the ledger *before* the noise exists (a crash never
          forgets a release) and counted by the budget's live accountant;
  noise   the mechanism's noise, from the keystream (<purpose>-noise, step), added in place
          (correlated across steps for banded MF: `NoiseMechanism.noise_process`);
  scale   divided by the public denominator (expected cohort or batch): the sensitivity is
          C / denominator whatever was sampled.

A reproducible resume re-draws the identical release for a step already in the ledger: it is
not counted again (`replay_identical`). A secure resume has a fresh key, so a re-done step is a
new release and is counted again. With banded MF (cyclic Poisson sampling) each ledger line
also names the user group the step sampled, and epsilon is the worst group's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from dp_accounting import dp_event

from fedsim.privacy.budget import PrivacyBudget
from fedsim.privacy.ledger import PrivacyLedger
from fedsim.privacy.mechanisms import NoiseMechanism
from fedsim.privacy.randomness import SecretRandomness


class Release:
    """The release of one method: `guard(step)` before the work of a step, `release(step, sum)`
    after it."""

    def __init__(self, *, mechanism: NoiseMechanism, event: dp_event.DpEvent, ledger: PrivacyLedger,
                 budget: PrivacyBudget, randomness: SecretRandomness, purpose: str, denominator: float,
                 resumed: bool = False, after_record: Callable[[int], None] | None = None):
        if not denominator > 0:
            raise ValueError(f"the release's denominator must be positive, got {denominator!r}")
        self.mechanism, self.event, self.ledger, self.budget = mechanism, event, ledger, budget
        self.randomness, self.purpose, self.denominator = randomness, purpose, float(denominator)
        # only a reproducible resume replays identical releases (the same key re-draws them)
        self.replay_identical = bool(resumed) and randomness.reproducible
        self.after_record = after_record  # fault injection: the worst moment to die
        # the mechanism's noise over the run's steps (independent, or correlated with a state)
        self.noise = mechanism.noise_process(randomness, f"{purpose}-noise")

    def _group(self, step: int) -> dict:
        """The ledger fields of the participation group step `step` samples ({} without groups)."""
        group = self.mechanism.participation_group(step)
        return {} if group is None else {"group": group, "groups": self.mechanism.participation_groups}

    def guard(self, step: int) -> float:
        """Epsilon spent once this step's release is made; raises BudgetExceededError if it
        would overspend (a replayed, identical release recorded before a crash is already counted)."""
        if self.replay_identical and self.ledger.has(step, self.event):
            return self.budget.spent()
        group = self._group(step)
        return self.budget.check(self.event, group.get("group"), group.get("groups"))

    def release(self, step: int, total: torch.Tensor, unclipped: int = 0,
                contributions: int = 0) -> tuple[torch.Tensor, dict]:
        """Record, noise `total` in place, scale; returns (noisy sum / denominator, released metrics).
        An adaptive clip also releases its noisy count of the `contributions` (users or examples in
        `total`) whose norm was within the clip, `unclipped`, and moves the clip: one event covers both."""
        group = self._group(step)
        if self.ledger.record(step, self.event, replay_identical=self.replay_identical, **group):
            self.budget.compose(self.event, group.get("group"), group.get("groups"))
        if self.after_record is not None:
            self.after_record(step)
        noisy, released = self.noise.add(total, step)
        released.update(self.mechanism.adapt_clip(unclipped, contributions,
                                                  self.randomness.stream(f"{self.purpose}-clip-count-noise", step)))
        return noisy.div(self.denominator), released


def kill_after_recording(crash_step: int | None) -> Callable[[int], None] | None:
    """`simulation.faults.server_crash_round`: SIGKILL this process right after that step's
    release is recorded, before its noise is applied (tests of crash safety)."""
    import os
    import signal

    if crash_step is None:
        return None
    return lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == crash_step else None
