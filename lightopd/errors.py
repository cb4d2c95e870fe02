"""The exceptions the CLI turns into one clear line: bad input (exit 2) and training that cannot go on (exit 1)."""


class InputError(Exception):
    """A problem with what the user gave us (a file, a record, a field, an option).

    The message names the thing at fault and, where it helps, what to do about it. Any other
    exception is an internal error (exit code 1).
    """


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept. Exit code 1."""


class NonFiniteLogits(InputError):
    """A model produced NaN or inf logits, so nothing can be sampled or scored from it (bad weights)."""
