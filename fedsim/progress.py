"""A progress bar for rounds/steps with epsilon spent and ETA (rich, on stderr)."""

from __future__ import annotations

import sys


class RoundProgress:
    def __init__(self, total: int, label: str = "rounds", enabled: bool = True):
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                               TextColumn("eps {task.fields[eps]}"), TextColumn("loss {task.fields[loss]}"),
                               TimeRemainingColumn(), transient=True)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, eps="-", loss="-")
        return self

    def update(self, done: int, eps: float, loss: float | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, eps=f"{eps:.3g}",
                           loss=f"{loss:.4f}" if loss is not None else "-")

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
