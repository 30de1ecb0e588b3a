"""User-facing errors: a message that says what is wrong and what to do, and an exit status."""

from __future__ import annotations


class GptqflowError(Exception):
    """A user-facing error: the message says what is wrong and what to do; the CLI prints it without a traceback."""

    #: The process exit status: 1 for refused inputs (a bad value, a missing file).
    exit_code = 1


class UsageError(GptqflowError):
    """A command line that names something that does not exist (exit status 2, not 1)."""

    exit_code = 2
