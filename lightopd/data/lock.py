"""One run per output: an exclusive lock on a directory, naming the run that holds it.

A run takes `exclusive(directory)` for as long as it writes there (`train --out`, `eval --out`,
each `--worker I/N` of rollout and score-teacher). The lock is an `flock` on a file in the
directory that also records the holder (pid, host, start time, command): a second run on the
same output stops with exit 2 and names the first. The kernel drops the lock when its process
dies, so the lock of a killed run is simply taken over (with a note naming the run it was).
The file is removed, still locked, when the run ends.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from lightopd.errors import InputError
from lightopd.progress import console

LOCK = ".lightopd.lock"


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str, name: str = LOCK) -> Iterator[None]:
    """Hold `directory`/`name` for the duration; InputError naming the holder if another run has it.
    `what` names the option, for messages (e.g. "--out runs/x")."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{what}: exists and is not a directory")
    made = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / name, "a+")
    except OSError as e:
        raise InputError(f"{what}: cannot write there ({e.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what}: in use by another lightopd run ({_holder(handle)}); wait for it to end, "
                             "or choose another output") from None
        previous = _holder(handle)
        if previous != "no record":
            console.print(f"{what}: taking over the lock of a run that ended without releasing it ({previous})",
                          soft_wrap=True)
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                   "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, handle)
        handle.flush()
        try:
            yield
        finally:
            (directory / name).unlink(missing_ok=True)  # while still locked: no one can take the old file
            fcntl.flock(handle, fcntl.LOCK_UN)
            if made and not any(directory.iterdir()):
                directory.rmdir()  # a run that failed before writing anything leaves no directory
    finally:
        handle.close()


def _holder(handle) -> str:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "null")
    except json.JSONDecodeError:
        return "no record"
    if not isinstance(record, dict):
        return "no record"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: {record.get('command')}"
