"""Errors that carry a one-line, user-facing message.

A :class:`ConfigError` names the offending value, what was expected and how to fix it. The CLI
prints its message alone (no traceback) and exits with code 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input from the user: a flag, an environment variable, an argument."""

    def __init__(self, what: str, value: object, expected: str, fix: str) -> None:
        self.what = what
        self.value = value
        self.expected = expected
        self.fix = fix
        super().__init__(f"{what}={value!r} is invalid: expected {expected}; {fix}")


class LaunchFailedError(RuntimeError):
    """A launched job failed; the message is the human summary (which rank, why, log tail)."""
