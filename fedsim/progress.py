"""Progress bars (rich, on stderr): rounds/steps with epsilon spent and ETA; a sweep's runs."""

from __future__ import annotations

import sys


class RoundProgress:
    """A rich bar on a terminal; without one (a pipe, a file, a notebook), plain lines: every
    round/step when there are at most 50, else every 5% and at each evaluation."""

    def __init__(self, total: int, label: str = "rounds", enabled: bool = True, say=print):
        self.total, self.label, self.say = total, label, say  # lines go where the run's messages go
        self.bar = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.bar
        self._p = None

    def __enter__(self):
        if self.bar:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                               TextColumn("eps {task.fields[eps]}"), TextColumn("loss {task.fields[loss]}"),
                               TimeRemainingColumn(), transient=True)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, eps="-", loss="-")
        return self

    def update(self, done: int, eps: float, loss: float | None = None, seconds: float | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, eps=f"{eps:.3g}",
                           loss=f"{loss:.4f}" if loss is not None else "-")
        elif self.lines and (self.total <= 50 or loss is not None or done == self.total
                             or done % max(1, self.total // 20) == 0):
            self.say(f"{self.label[:-1]} {done}/{self.total}: epsilon {eps:.4g}"
                     + (f", eval loss {loss:.4f}" if loss is not None else "")
                     + (f", {seconds:.2f} s" if seconds is not None else ""))

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


class RunProgress:
    """A sweep's runs with ETA; without a terminal, one line per finished comparison instead."""

    def __init__(self, total: int, completed: int = 0, label: str = "runs"):
        self.total, self.completed, self.label = total, completed, label
        self._p = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               TextColumn("ETA"), TimeRemainingColumn())
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, completed=self.completed)
        return self

    def advance(self, n: int, line: str) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=n)
            self._p.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
