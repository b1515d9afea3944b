"""The budget guard: a release happens only if the ledger plus it stays within (epsilon, delta)."""

from __future__ import annotations

import math

from dp_accounting import dp_event

from fedsim.errors import BudgetExceededError
from fedsim.privacy.accounting import Accountant
from fedsim.privacy.ledger import PrivacyLedger


class PrivacyBudget:
    def __init__(self, ledger: PrivacyLedger, accountant: Accountant, delta: float, target_epsilon: float | None):
        self.ledger, self.accountant, self.delta, self.target = ledger, accountant, delta, target_epsilon

    def spent(self) -> float:
        if len(self.ledger) == 0:
            return 0.0
        return self.accountant.epsilon(self.ledger.total_event(), self.delta)

    def epsilon_with(self, event: dp_event.DpEvent) -> float:
        return self.accountant.epsilon(self.ledger.total_event([event]), self.delta)

    def check(self, event: dp_event.DpEvent) -> float:
        """Epsilon after `event`; raises BudgetExceededError if that exceeds the target."""
        eps = self.epsilon_with(event)
        if self.target is not None and not (eps <= self.target * (1 + 1e-9)):
            raise BudgetExceededError(
                f"the next release would spend epsilon={eps:.4g} > budget {self.target:g} at delta={self.delta:g}"
                f" ({len(self.ledger)} releases so far); stopping"
            )
        return eps if math.isfinite(eps) else math.inf
