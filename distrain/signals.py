"""Signal handling in one place: which signals distrain handles, installing and restoring handlers.

Every handler distrain installs goes through :func:`install` and comes back out through
:func:`restore` (or the context managers built on them), so the rules live here once: only the
main thread may install handlers, and a handler set outside Python (``None``) is left alone.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FrameType
from typing import Any

__all__ = [
    "HANDLED_SIGNALS",
    "SCHEDULER_STOP_SIGNALS",
    "SIGNAL_NAMES",
    "Handler",
    "in_main_thread",
    "install",
    "installed",
    "restore",
    "restored_signal_handlers",
]

# What signal.signal takes and returns: a function, SIG_DFL/SIG_IGN, or None (set outside Python).
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# What the launchers forward to workers (torchrun's TORCHELASTIC_SIGNALS_TO_HANDLE).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# The same list as torchrun's agent exports it to workers ("SIGTERM,SIGINT,SIGHUP,SIGQUIT").
SIGNAL_NAMES = ",".join(sig.name for sig in HANDLED_SIGNALS)
# What a scheduler sends every process of a job to stop it (SLURM's step signal, kill -TERM -PGID).
SCHEDULER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def in_main_thread() -> bool:
    """Python runs signal handlers, and lets them be installed, only in the main thread."""
    return threading.current_thread() is threading.main_thread()


def install(signums: Iterable[int], handler: Handler) -> dict[signal.Signals, Handler]:
    """Install ``handler`` for each of ``signums``; return the handlers it replaced.

    Args:
        signums: The signals.
        handler: A function ``(signum, frame)``, ``signal.SIG_DFL`` or ``signal.SIG_IGN``.

    Returns:
        Each signal's previous handler, for :func:`restore`.
    """
    return {signal.Signals(sig): signal.signal(sig, handler) for sig in signums}  # type: ignore[arg-type]


def restore(previous: Mapping[signal.Signals, Handler], *, unknown: Handler = None) -> None:
    """Put back the handlers :func:`install` returned.

    Args:
        previous: Signal -> handler to put back.
        unknown: What to install where the previous handler was set outside Python (``None``);
            None leaves the current handler in place.
    """
    for sig, handler in previous.items():
        chosen = unknown if handler is None else handler
        if chosen is not None:
            signal.signal(sig, chosen)  # type: ignore[arg-type]


@contextlib.contextmanager
def installed(signums: Iterable[int], handler: Handler, *, unknown: Handler = None) -> Iterator[bool]:
    """``handler`` for ``signums`` inside the block, the previous handlers after it.

    Outside the main thread nothing is installed (signals keep their usual effect).

    Args:
        signums: The signals.
        handler: What to install.
        unknown: Passed to :func:`restore`.

    Yields:
        Whether the handler was installed.
    """
    if not in_main_thread():
        yield False
        return
    previous = install(signums, handler)
    try:
        yield True
    finally:
        restore(previous, unknown=unknown)


@contextlib.contextmanager
def restored_signal_handlers() -> Iterator[None]:
    """Give a Python caller of ``launch``/``run`` its own handlers back afterwards.

    torch elastic's agent installs handlers that raise SignalException, and Ray's driver one
    that exits; both stay installed after the launch returns unless put back.
    """
    if not in_main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        restore(saved)  # None: installed outside Python, nothing to put back
