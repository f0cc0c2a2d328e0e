"""Signal handling in one place: which signals distrain handles, and putting handlers back."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["HANDLED_SIGNALS", "SIGNAL_NAMES", "restored_signal_handlers"]

# What the launchers forward to workers (torchrun's TORCHELASTIC_SIGNALS_TO_HANDLE).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# The same list as torchrun's agent exports it to workers ("SIGTERM,SIGINT,SIGHUP,SIGQUIT").
SIGNAL_NAMES = ",".join(sig.name for sig in HANDLED_SIGNALS)


@contextlib.contextmanager
def restored_signal_handlers() -> Iterator[None]:
    """Give a Python caller of ``launch``/``run`` its own handlers back afterwards.

    torch elastic's agent installs handlers that raise SignalException, and Ray's driver one
    that exits; both stay installed after the launch returns unless put back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: installed outside Python, nothing to put back
                signal.signal(sig, handler)
