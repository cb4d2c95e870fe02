"""The stderr console: rich progress bars for long stages (items done, tokens/s, ETA) and warnings."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def warn(message: str) -> None:
    """One 'warning: ...' line on stderr."""
    from rich.text import Text

    console.print(Text("warning: ", style="yellow") + Text(message), soft_wrap=True)


class StageProgress:
    """A progress bar counting items (samples, rows) that also shows tokens/s since the start."""

    def __init__(self, description: str, total: int, completed: int = 0, disable: bool = False):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=disable,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, rate="-", status="")
        self.tokens = 0
        self._start = time.perf_counter()

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start

    def add_total(self, items: int) -> None:
        """Count `items` more (or, negative, fewer) to do: work found smaller once it is read."""
        task = self._progress.tasks[0]
        self._progress.update(self._task, total=(task.total or 0) + items)

    def advance(self, items: int = 0, tokens: int = 0, status: str | None = None) -> None:
        self.tokens += tokens
        rate = f"{self.tokens / self.seconds:,.0f}" if self.seconds > 0 else "-"
        fields = {"rate": rate} if status is None else {"rate": rate, "status": status}
        self._progress.update(self._task, advance=items, **fields)
