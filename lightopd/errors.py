"""The one exception type for bad input: the CLI turns it into exit code 2 and one clear line."""


class InputError(Exception):
    """A problem with what the user gave us (a file, a record, a field, an option).

    The message names the thing at fault and, where it helps, what to do about it. Any other
    exception is an internal error (exit code 1).
    """


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept. Exit code 1."""
