"""Errors that carry a one-line, user-facing message.

A :class:`ConfigError` names the offending value, what was expected and how to fix it. The CLI
prints its message alone (no traceback) and exits with :data:`EXIT_USAGE` (2); every exit code
of the ``distrain`` commands is defined here.
"""

from __future__ import annotations

import argparse
import difflib
import signal
import sys
from typing import NoReturn

# Exit codes of the ``distrain`` commands (one place: every subcommand uses these).
EXIT_OK = 0
EXIT_FAILED = 1  # the job failed, or a checkpoint is bad (``distrain ckpt``)
EXIT_USAGE = 2  # bad input: one line on stderr, no traceback (argparse's code too)


class ConfigError(ValueError):
    """Bad input from the user: a flag, an environment variable, an argument."""

    def __init__(self, what: str, value: object, expected: str, fix: str) -> None:
        self.what = what
        self.value = value
        self.expected = expected
        self.fix = fix
        super().__init__(f"{what}={value!r} is invalid: expected {expected}; {fix}")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with "did you mean") and exit :data:`EXIT_USAGE`."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message or "ambiguous option" in message:
            bad = message.split(":", 1)[-1].split()[0] if ":" in message else ""
            known = [s for a in self._actions for s in a.option_strings]
            close = difflib.get_close_matches(bad.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]}?"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the reason.

    Defined here, below every module that raises it: :func:`distrain.group.cleanup` raises it
    too (for an asynchronous save that failed), and re-exported by :mod:`distrain.ckpt`."""


class LaunchFailedError(RuntimeError):
    """A launched job failed; the message is the human summary (which rank, why, log tail)."""



def usage_error(prog: str, message: object) -> int:
    """Print ``PROG: error: MESSAGE`` as one line on stderr; return :data:`EXIT_USAGE`.

    Args:
        prog: The command as the user typed it, e.g. ``"distrain report"``.
        message: The error (a :class:`ConfigError` names the value, what was expected, the fix).

    Returns:
        :data:`EXIT_USAGE`.
    """
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def signal_exit(name: str | None) -> int:
    """The shell's exit code for a command stopped by signal ``name`` (128 + its number).

    Args:
        name: A signal name such as ``"SIGTERM"``.

    Returns:
        128 + the signal's number, or :data:`EXIT_FAILED` for an unknown name.
    """
    try:
        return 128 + int(signal.Signals[name or ""])
    except KeyError:
        return EXIT_FAILED
