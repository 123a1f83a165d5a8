"""Progress bars: rich on rank 0 when stderr is a terminal, silent otherwise (logs carry the facts)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(label: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; a no-op when disabled or not on a TTY."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    ) as prog:
        task = prog.add_task(label, total=total, completed=completed)
        yield lambda n=1: prog.advance(task, n)
