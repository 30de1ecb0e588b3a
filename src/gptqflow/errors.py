"""The one user-facing error type."""

from __future__ import annotations


class GptqflowError(Exception):
    """A user-facing error: the message says what is wrong and what to do; the CLI prints it without a traceback."""
