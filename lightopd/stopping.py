"""When a run's store has gone stale: `--stop-when NAME<X` (train) and `--refresh-when` (rounds),
read from the metrics of each step, or (with a window of W steps) from their mean over the last W
steps, which a single noisy step cannot cross and which cannot end a run before its W-th step."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from lightopd.errors import InputError


def stop_rule(text: str | None, flag: str = "--stop-when") -> tuple[str, str, float] | None:
    """(metric, '<' or '>', threshold) of `NAME<X` or `NAME>X` (None without one); `flag` names the
    option in its error."""
    if text is None:
        return None
    for op in "<>":
        name, found, value = text.partition(op)
        if found:
            try:
                return name.strip(), op, float(value)
            except ValueError:
                break
    raise InputError(f"{flag} {text!r}: expected NAME<X or NAME>X with NAME a metrics.jsonl key and X a "
                     "number, e.g. is_ess<0.8 or rollout_kl>0.02")


class StopRule:
    """A rule and the window of its metric's last values (`earlier`: the records of the steps before
    this run's first, on a resumed run, so that a resumed run decides as the run never killed)."""

    def __init__(self, text: str, window: int = 1, earlier: Iterable[dict] = ()):
        self.text = text
        self.name, self.op, self.threshold = stop_rule(text)
        self.values: deque[float] = deque(maxlen=window)
        for record in earlier:
            if self.name in record:  # (a step logged without it, by an older version: not counted)
                self._add(record)

    def _add(self, record: dict) -> None:
        if self.name not in record:
            known = ", ".join(k for k, v in record.items() if isinstance(v, (int, float)))
            raise InputError(f"--stop-when: this run's metrics have no {self.name!r} (they are: {known})")
        if record[self.name] is not None:  # (a step with no such value, e.g. no sampled token: not counted)
            self.values.append(float(record[self.name]))

    @property
    def value(self) -> float | None:
        """The metric's mean over the window, once the window is full."""
        full = len(self.values) == self.values.maxlen
        return sum(self.values) / len(self.values) if full else None

    def crossed(self, record: dict) -> bool:
        """Add a step's record; whether the window's mean now crosses the threshold."""
        self._add(record)
        value = self.value
        return value is not None and (value < self.threshold if self.op == "<" else value > self.threshold)
