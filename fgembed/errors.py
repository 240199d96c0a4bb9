"""User-facing errors.

A `FgembedError` is bad input, not a bug: the CLI prints its message as one line on stderr and
exits with `exit_code`, no traceback. Library callers catch it like any exception.
"""
from __future__ import annotations


class FgembedError(Exception):
    """Bad input or a refused operation; the message is one line a person can act on."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
