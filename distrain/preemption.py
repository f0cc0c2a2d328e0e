"""Save on preemption: turn SIGTERM into a flag every rank agrees on at the same step.

A scheduler preempts a job by sending SIGTERM to the launcher, which forwards it to every worker
and waits ``--term-timeout`` seconds before killing them. Ranks receive the signal at slightly
different moments, so acting on it locally would have one rank save (a collective) while another
trains on. :class:`StopSignal` records the signal and :meth:`StopSignal.agreed` reduces the flag
over the group (one 1-element all-reduce), so all ranks see it at the same step::

    stop = StopSignal()
    for step in ...:
        train_step()
        if stop.agreed():
            ckpt.save(step, **state)
            ckpt.wait()
            break            # then ddp.cleanup(); the launcher exits 143 (128 + SIGTERM)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from distrain.collectives import reduce_max
from distrain.errors import ConfigError
from distrain.signals import in_main_thread, install, restore

__all__ = ["StopSignal"]


class StopSignal:
    """Catches ``signals`` (default SIGTERM) in this process; :meth:`agreed` is collective.

    Install it in the main thread, before the training loop. A Python handler that was already
    installed still runs (``TBLogger``'s flushes its events); the default action (end the
    process) does not, which is the point. :meth:`restore` puts the previous handlers back.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM,)) -> None:
        if not in_main_thread():
            raise ConfigError("StopSignal()", threading.current_thread().name, "the main thread",
                              "create it in the main thread (Python delivers signals there)")
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for signum in signals:
            self._previous.update(install([signum], self._handler(signal.Signals(signum))))

    @property
    def requested(self) -> bool:
        """This rank received one of the signals (no communication)."""
        return self.received is not None

    def agreed(self) -> bool:
        """True on every rank, at the same call, once any rank received a signal.

        Collective when a process group is initialised: call it on every rank at the same point
        of the loop (e.g. after each optimizer step).
        """
        return reduce_max({"stop": 1.0 if self.requested else 0.0})["stop"] > 0

    def restore(self) -> None:
        """Put back the handlers that were installed before this object."""
        restore(self._previous)
        self._previous.clear()

    def _handler(self, signum: signal.Signals) -> Callable[[int, FrameType | None], None]:
        def handler(number: int, frame: FrameType | None) -> None:
            self.received = signum
            previous = self._previous.get(signum)
            sink = getattr(previous, "distrain_sink", None)
            if sink is not None:  # TBLogger's handler: flush, but not its "then die as before"
                sink.flush_for_signal()
            elif callable(previous):
                previous(number, frame)

        return handler

