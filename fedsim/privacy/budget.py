"""The budget guard: a release happens only if everything released so far plus it stays
within (epsilon, delta).

One live dp_accounting `PrivacyAccountant`, composed once per run of identical releases;
the current run is composed as one `SelfComposedDpEvent(event, n)` when asked. A check costs
the same after 10 or 10,000 releases and equals, bit for bit, what the accountant computes
from the ledger's run-length form (`fedsim account RUN_DIR`). The ledger is the durable
record: a resumed run rebuilds the budget from it once.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable

from dp_accounting import dp_event
from dp_accounting import privacy_accountant as dpa

from fedsim.errors import BudgetExceededError
from fedsim.privacy.ledger import WorstGroup


class PrivacyBudget:
    def __init__(self, make_accountant: Callable[[], dpa.PrivacyAccountant], delta: float,
                 target_epsilon: float | None, history: Iterable[dp_event.DpEvent] = (),
                 groups: Iterable[int | None] | None = None, partitions: Iterable[int | None] | None = None):
        self.delta, self.target = delta, target_epsilon
        self._done = make_accountant()  # composed with every finished run
        self._run: list | None = None  # [event, count] of the current run, not yet composed
        self._worst = WorstGroup()  # releases on one participation group count for the worst group only
        self.releases = 0
        for event, group, n in zip(history, groups if groups is not None else itertools.repeat(None),
                                   partitions if partitions is not None else itertools.repeat(None)):
            self.compose(event, group, n)

    def compose(self, event: dp_event.DpEvent, group: int | None = None, groups: int | None = None) -> None:
        """Count one release (once it is recorded in the ledger); `group`: the participation group it
        touches (banded MF), None if every user; `groups`: how many groups its partition has."""
        self.releases += 1
        if not self._worst.add(event, group, groups):  # within the worst group's count: epsilon unchanged
            return
        if self._run is not None and self._run[0] == event:
            self._run[1] += 1
            return
        if self._run is not None:
            self._done.compose(*self._run)
        self._run = [event, 1]

    def _epsilon(self, extra: dp_event.DpEvent | None = None) -> float:
        pending = [list(self._run)] if self._run is not None else []
        if extra is not None:
            if pending and pending[-1][0] == extra:
                pending[-1][1] += 1
            else:
                pending.append([extra, 1])
        if not pending:
            return 0.0
        acc = copy.deepcopy(self._done)
        for event, count in pending:
            acc.compose(event, count)
        eps = float(acc.get_epsilon(self.delta))
        return eps if math.isfinite(eps) else math.inf  # NaN counts as unbounded

    def spent(self) -> float:
        return self._epsilon()

    def check(self, event: dp_event.DpEvent, group: int | None = None, groups: int | None = None) -> float:
        """Epsilon after `event` (on `group` of `groups`); raises BudgetExceededError if that exceeds the target."""
        eps = self._epsilon(event if self._worst.adds(event, group, groups) else None)
        if self.target is not None and not (eps <= self.target * (1 + 1e-9)):
            raise BudgetExceededError(
                f"the next release would spend epsilon={eps:.4g} > budget {self.target:g} at delta={self.delta:g}"
                f" ({self.releases} releases so far); stopping")
        return eps
