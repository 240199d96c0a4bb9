"""Progress bars on stderr (results go to stdout), with items per second.

A bar is one line at any width: a long description (a run's label) is cut with an ellipsis
rather than wrapped, and is printed as plain text (labels may hold `[`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

stderr = Console(stderr=True)

Tick = Callable[..., None]  # tick(n=1, description=None): advance n; a new description replaces the old


def wall_rate(task: Task) -> float | None:
    """Items per second over the bar's whole wall time. Not rich's own speed: that is measured
    between the first and the last update of a recent window, so work that arrives in bursts (a
    batch's results read a batch later, then the last one drained at once) showed thousands of
    images per second for a job that ran at 67."""
    elapsed = task.finished_time if task.finished else task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = wall_rate(task)
        return Text(f"{rate:,.1f} {self.unit}/s" if rate else f"– {self.unit}/s", style="cyan")


class RemainingColumn(ProgressColumn):
    """Time left at the wall-time rate (rich's own estimate uses the bursty windowed speed)."""

    def render(self, task: Task) -> Text:
        rate = wall_rate(task)
        if task.finished or not rate or task.total is None:
            return Text("-:--:--" if not task.finished else "0:00:00", style="progress.remaining")
        seconds = int((task.total - task.completed) / rate)
        return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.remaining")


def _columns(unit: str) -> tuple[ProgressColumn, ...]:
    # description and bar share what the counters leave (ratio 1:1); the description never wraps
    description = Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=12)
    return (TextColumn("{task.description}", style="bold", markup=False, table_column=description),
            BarColumn(bar_width=None, table_column=Column(ratio=1)), MofNCompleteColumn(), RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), RemainingColumn())


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "img",
                 console: Optional[Console] = None) -> Iterator[Tick]:
    """Yield `tick(n=1, description=None)`; shows nothing when disabled or when there is nothing to do."""
    if not enabled or total == 0:
        yield lambda n=1, description=None: None
        return
    with Progress(*_columns(unit), console=console or stderr, transient=False, expand=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1, description=None: progress.update(task, advance=n, description=description)
