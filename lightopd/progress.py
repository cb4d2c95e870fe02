"""The stderr console: progress of long stages (items done, tokens/s, ETA) and warnings.

On a terminal, progress is a rich bar redrawn in place. Elsewhere (a batch job's log, `nohup`,
`2> log`) a bar would only write its last frame, so a plain line is written instead when the stage
starts, every LIGHTOPD_PROGRESS_SECONDS seconds (30 by default) from a timer thread, whether or not
an item finished since (a log that keeps repeating the same count is a stage that is stuck, not
slow), and when it ends.
"""

from __future__ import annotations

import os
import threading
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
INTERVAL = "LIGHTOPD_PROGRESS_SECONDS"  # seconds between plain progress lines (not on a terminal)


def interval() -> float:
    """Seconds between plain progress lines: LIGHTOPD_PROGRESS_SECONDS when it is a positive number, else 30."""
    try:
        value = float(os.environ.get(INTERVAL, 30))
    except ValueError:
        value = 0.0
    return value if value > 0 and value == value else 30.0


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def warn(message: str) -> None:
    """One 'warning: ...' line on stderr."""
    from rich.text import Text

    console.print(Text("warning: ", style="yellow") + Text(message), soft_wrap=True)


class StageProgress:
    """Progress counting items (samples, rows, steps) that also shows tokens/s since the start: a
    rich bar on a terminal, plain timed lines elsewhere (see the module doc)."""

    def __init__(self, description: str, total: int, completed: int = 0, disable: bool = False):
        self.description, self.total, self.completed, self.status = description, total, completed, ""
        self._first = completed
        self.tokens = 0
        self._start = time.perf_counter()
        self._plain = not disable and not console.is_terminal and not console.quiet
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
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
            disable=disable or self._plain,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, rate="-", status="")

    def __enter__(self) -> StageProgress:
        if self._plain:
            self.line()
            self._timer = threading.Thread(target=self._every, args=(interval(),), daemon=True)
            self._timer.start()
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()
        if self._timer is not None:
            self._stop.set()
            self._timer.join()
            self.line()

    def _every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.line()

    def line(self) -> None:
        """One plain line: `stage: done/total (pct) rate tok/s status elapsed H:MM:SS eta H:MM:SS`."""
        elapsed = self.seconds
        done = self.completed - self._first
        left = self.total - self.completed
        eta = elapsed / done * left if done > 0 and left >= 0 else None
        share = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        rate = f"{self.tokens / elapsed:,.0f}" if elapsed > 0 else "-"
        status = f" {self.status}" if self.status else ""
        console.print(f"{self.description}: {self.completed}/{self.total}{share} {rate} tok/s{status} "
                      f"elapsed {_clock(elapsed)} eta {_clock(eta)}", highlight=False, soft_wrap=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start

    def add_total(self, items: int) -> None:
        """Count `items` more (or, negative, fewer) to do: work found smaller once it is read."""
        self.total += items
        self._progress.update(self._task, total=self.total)

    def advance(self, items: int = 0, tokens: int = 0, status: str | None = None) -> None:
        self.tokens += tokens
        self.completed += items
        self.status = self.status if status is None else status
        rate = f"{self.tokens / self.seconds:,.0f}" if self.seconds > 0 else "-"
        fields = {"rate": rate} if status is None else {"rate": rate, "status": status}
        self._progress.update(self._task, advance=items, **fields)
