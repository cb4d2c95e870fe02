"""One run per output: an exclusive lock on a directory, naming the run that holds it.

A run takes `exclusive(directory)` for as long as it writes there (`train --out`, `eval --out`,
each `--worker I/N` of rollout and score-teacher). The lock is an `flock` on a file in the
directory that also records the holder (pid, host, start time, command): a second run on the
same output stops with exit 2 and names the first. The kernel drops the lock when its process
dies, so the lock of a killed run is simply taken over (with a note naming the run it was).
The file is removed, still locked, when the run ends. It is never opened through a symbolic link
(O_NOFOLLOW): a link planted at its name stops the run with exit 2 instead of clobbering the file it
points to, which matters on the shared filesystems where anyone who can write the output could plant one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import stat
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
        handle = open_nofollow(directory / name)
    except SymlinkRefused as e:
        raise InputError(f"{what}: {e.strerror}") from None
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


class SymlinkRefused(OSError):
    """A file lightopd writes in place is a symbolic link: it is never followed."""


def open_nofollow(path: Path, mode: str = "a+"):
    """`path` opened for reading and writing (created if missing), never through a symbolic link:
    a link planted at a lock's name would otherwise make the run overwrite the file it points to."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise SymlinkRefused(e.errno, f"{path.name} is a symbolic link (to {os.readlink(path)}); lightopd never "
                                 "writes through one: remove it", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SymlinkRefused(errno.EINVAL, f"{path.name} is not a regular file; remove it", str(path))
    return os.fdopen(fd, mode)


def _holder(handle) -> str:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "null")
    except json.JSONDecodeError:
        return "no record"
    if not isinstance(record, dict):
        return "no record"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: {record.get('command')}"
