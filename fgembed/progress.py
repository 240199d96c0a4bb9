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
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

stderr = Console(stderr=True)

Tick = Callable[..., None]  # tick(n=1, description=None): advance n; a new description replaces the old


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s", style="cyan")


def _columns(unit: str) -> tuple[ProgressColumn, ...]:
    # description and bar share what the counters leave (ratio 1:1); the description never wraps
    description = Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=12)
    return (TextColumn("{task.description}", style="bold", markup=False, table_column=description),
            BarColumn(bar_width=None, table_column=Column(ratio=1)), MofNCompleteColumn(), RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


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
