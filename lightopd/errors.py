"""The exceptions the CLI turns into one clear line: bad input (exit 2), and training or an environment
that cannot go on (exit 1): a full disk or a file-size limit met while writing."""

import errno
import os


class InputError(Exception):
    """A problem with what the user gave us (a file, a record, a field, an option).

    The message names the thing at fault and, where it helps, what to do about it. Any other
    exception is an internal error (exit code 1).
    """


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept. Exit code 1."""


class NonFiniteLogits(InputError):
    """A model produced NaN or inf logits, so nothing can be sampled or scored from it (bad weights)."""


FULL_DISK = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file-size limit was reached",
             errno.EDQUOT: "the disk quota is used up"}


def full_disk(error: BaseException) -> str | None:
    """What a failed write says about the disk (None: not a full disk), from an OSError anywhere in the
    exception's chain or a safetensors error carrying the OS error's text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_DISK:
            where = f" ({error.filename})" if error.filename else ""
            return FULL_DISK[error.errno] + where
        text = str(error)
        for code, what in FULL_DISK.items():
            if os.strerror(code) in text or f"os error {code})" in text:
                return what
        error = error.__cause__ or error.__context__
    return None
