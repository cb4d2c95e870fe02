"""A checker of your own, run in a process of its own: user code is not trusted to behave.

`CheckerProcess(name, timeout)` imports the function that `--checker MODULE:FUNCTION` (or
`FILE.py:FUNCTION`) names in one worker process, which lives as long as the object is open: eval
opens it once, before any model is loaded, and rollout can compute rewards through the same
object. Each call sends the worker (completion, reference, metadata) and waits at most `timeout`
seconds for what the function returned, which comes back as it is (verifiers.py reads the
verdict). Whatever the function, or its module's import, does, lightopd goes on to say so, as
InputError naming the checker (what it prints goes to stderr, so stdout keeps lightopd's one JSON line):
- it raises: the exception;
- it calls sys.exit (SystemExit, whatever the code): a checker must return its verdict;
- it does not return within `timeout` (nor finish importing): the worker is killed, and the
  message names `--checker-timeout`, which raises the limit;
- it ends the process (os._exit, a crash, a signal): the exit code or the signal;
- it returns something other than plain data (see `_plain`): no object of the user's classes is
  ever read back, so no code of theirs runs in the lightopd process.
After the worker was killed or died, the next call starts a new one. The worker ignores Ctrl-C
(lightopd handles it, and ends the worker), dies with the lightopd process on Linux even when
that is killed with SIGKILL (PR_SET_PDEATHSIG), and is always reaped on close: it leaves no
zombie and no orphan. It is started with multiprocessing's "fork" where the platform has it
(cheap, and it inherits the working directory and sys.path), else "spawn" (it imports the
function by name itself).

The built-in checkers (`auto`, `exact`, `math`) and reasoning-gym's scorers do not come here: they
run in the lightopd process, since they are code this project ships or pins and tests, and there
they cost no round trip per sample. Only code named on the command line runs in the worker.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import multiprocessing
import numbers
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from lightopd.errors import InputError

TIMEOUT_FLAG = "--checker-timeout"
CLOSE_WAIT = 5.0  # seconds a worker asked to stop gets before it is killed
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def load_function(name: str) -> Callable:
    """The function `MODULE:FUNCTION` or `FILE.py:FUNCTION` names, imported (in the worker); InputError if it
    cannot be had."""
    where, _, function = name.rpartition(":")
    if not where or not function.isidentifier():
        raise InputError(f"--checker {name}: not MODULE:FUNCTION nor FILE.py:FUNCTION")
    try:
        if where.endswith(".py") or os.sep in where:
            path = Path(where)
            if not path.is_file():
                raise InputError(f"--checker {name}: no such file {where}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `lightopd` is a script: make the working directory importable
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except InputError:
        raise
    except SystemExit as e:
        raise InputError(f"--checker {name}: importing {where} called sys.exit({e.code!r})") from None
    except BaseException as e:  # the user's module failed to import: name it and the error
        raise InputError(f"--checker {name}: cannot import {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise InputError(f"--checker {name}: {where} has no function {function!r}")
    return fn


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the lightopd process ends, however it ends (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before that took effect
        os._exit(1)


def _serve(name: str, parent: int, conn, other_end) -> None:
    """The worker: import the function, then answer one call per message until told to stop (None) or
    the lightopd end of the pipe closes."""
    other_end.close()  # a forked worker's copy of lightopd's end: without it, EOF would never come
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, ValueError):  # what a checker prints is log, never lightopd's JSON on stdout
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), 1)
    sys.stdout = sys.stderr
    _die_with(parent)
    with contextlib.suppress(EOFError, OSError):  # lightopd has gone: so does the worker, without a word
        try:
            fn = load_function(name)
        except InputError as e:
            conn.send(("fatal", str(e)))  # and the worker ends
            return
        conn.send(("ready", None))
        while (args := conn.recv()) is not None:
            conn.send(_call(name, fn, args))


def _call(name: str, fn: Callable, args: tuple) -> tuple[str, object]:
    """("ok", what `fn` returned, as plain data) or ("error", why there is no such thing)."""
    try:
        return "ok", _plain(fn(*args))
    except SystemExit as e:
        return "error", f"--checker {name} called sys.exit({e.code!r}); a checker must return its verdict"
    except _NotPlain as e:
        return "error", (f"--checker {name} returned {e}, which lightopd does not take back from a checker; it "
                         "must return a bool, a number, or a pair (one of those, the answer it read)")
    except BaseException as e:
        return "error", f"--checker {name} raised {type(e).__name__}: {e}"


class _NotPlain(Exception):
    """A value that is not plain data (its message names its type)."""


def _plain(value, depth: int = 0):
    """`value` as plain data, all that comes back from the worker: None, bools, numbers (numpy's and other
    real numbers as Python's int and float), text, and lists, tuples and dicts of these. Nothing else
    crosses, so reading a reply never imports or runs the user's code in the lightopd process."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if depth > 32:
        raise _NotPlain("data nested too deep")
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # a numpy scalar or 0-d array
        return _plain(value.item(), depth + 1)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    raise _NotPlain(f"a {type(value).__name__}")


class CheckerProcess:
    """A user's checker function in its own worker process (see the module docstring)."""

    def __init__(self, name: str, timeout: float):
        self.name, self.timeout = name, timeout
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(method)
        self._process = self._conn = None

    def __enter__(self) -> CheckerProcess:
        self.start()
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:  # the run failed or was interrupted, maybe mid-call: the worker need not finish anything
            self._kill()

    def start(self) -> None:
        """Start the worker and wait until it has imported the function (InputError if it cannot)."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(self.name, os.getpid(), theirs, ours),
                                        name=f"lightopd checker {self.name}")
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        try:
            self._reply(f"did not finish importing within {self.timeout:g} s")
        except BaseException:  # Ctrl-C while it imports, say: no worker is left behind
            self._kill()
            raise

    def __call__(self, completion: str, reference: str | None, metadata: dict):
        """What the function returned for one sample; InputError if it did not return (see the module docstring)."""
        if self._process is None:
            self.start()
        with contextlib.suppress(OSError):  # a worker that is gone: _reply says how it ended
            self._conn.send((completion, reference, metadata))
        return self._reply(f"did not return within {self.timeout:g} s")

    def _reply(self, late: str):
        try:
            ready = self._conn.poll(self.timeout)
            message = self._conn.recv() if ready else None
        except (EOFError, OSError):
            raise InputError(f"--checker {self.name} {self._ended()} instead of returning a verdict") from None
        if not ready:
            self._kill()
            raise InputError(f"--checker {self.name} {late}; fix it or raise {TIMEOUT_FLAG}")
        kind, value = message
        if kind == "fatal":
            self.close()
        if kind in ("error", "fatal"):
            raise InputError(value)
        return value

    def _ended(self) -> str:
        """How the worker ended (it closed its end of the pipe); it is reaped."""
        process = self._process
        process.join(CLOSE_WAIT)
        code = process.exitcode
        self._kill()
        if code is None:
            return "closed its connection to lightopd"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"ended the checker process by signal {signal.Signals(-code).name}"
            return f"ended the checker process by signal {-code}"
        return f"ended the checker process (exit code {code})"

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._process.close()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def close(self) -> None:
        """Stop the worker (asked, then killed if it does not end within CLOSE_WAIT seconds) and reap it."""
        if self._process is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(CLOSE_WAIT)
        self._kill()
