"""The durable half of TBLogger: synchronous event writes, exact flushes, SIGTERM, fork safety.

``tensorboardX.SummaryWriter.flush()`` does not drain its event queue: points added just before
it are often not on disk after it returns (TensorBoard's reader misses them right after
``flush()``). :class:`Sink` makes the writer's file writer write each event at once
into the file buffer, so a flush is exact, and flushes it on an interval, on request and on
SIGTERM. It holds no reference to the logger, so a logger dropped without ``close()`` is
garbage collected and its finalizer closes the sink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from distrain.signals import in_main_thread, install, restore

__all__ = ["Sink"]

log = logging.getLogger("distrain")
# A SIGTERM can arrive while the main thread holds the write lock; wait this long, then give up
# flushing rather than deadlock in the handler.
_SIGNAL_LOCK_TIMEOUT = 2.0


class Sink:
    """The open writer of one TBLogger, shared with its flush thread, finalizer, SIGTERM handler."""

    def __init__(self, writer: Any) -> None:
        self.writer: Any = writer
        self.records = _make_synchronous(writer.file_writer)
        self.lock = threading.Lock()
        self.closed = False
        self.stop = threading.Event()
        self.flusher: threading.Thread | None = None
        self.previous_sigterm: Any = None
        # A forked child (a DataLoader worker) inherits this object with a copy of the unflushed
        # buffer; flushing that copy would write the points twice. Only the creator writes.
        self.pid = os.getpid()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Any]:
        """The writer under the lock, or None once closed."""
        with self.lock:
            yield self.writer if self.open else None

    @property
    def open(self) -> bool:
        """Not closed by us, nor by tensorboardX's own atexit hook (which every SummaryWriter
        registers, and which runs before ``ddp.cleanup``'s when a script never closed its logger;
        it flushes before closing, so nothing is lost)."""
        events = getattr(self.writer.file_writer, "event_writer", None)
        return not self.closed and not getattr(events, "_closed", False)

    def flush(self) -> None:
        with self.lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self.open or os.getpid() != self.pid:
            return
        if self.records is not None:
            self.records.flush()
        else:
            self.writer.flush()

    def start_flushing(self, every: float) -> None:
        self.flusher = threading.Thread(target=self._flush_loop, args=(every,),
                                        name="distrain-tb-flush", daemon=True)
        self.flusher.start()

    def _flush_loop(self, every: float) -> None:
        while not self.stop.wait(every):
            try:
                self.flush()
            except Exception as error:  # a full disk must not kill training; report, go on
                log.warning("distrain: TensorBoard flush failed: %s", error)

    def close(self) -> None:
        if os.getpid() != self.pid:
            return
        self.stop.set()
        flusher, self.flusher = self.flusher, None
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.writer.close()
        self._restore_sigterm()

    # SIGTERM is what the launcher sends the surviving ranks when one rank fails.

    def install_sigterm(self) -> None:
        if not in_main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN or previous is None:
            return  # ignored, or set outside Python: leave it alone
        self.previous_sigterm = previous
        install([signal.SIGTERM], _sigterm_handler(self, previous))

    def _restore_sigterm(self) -> None:
        previous, self.previous_sigterm = self.previous_sigterm, None
        if previous is None or not in_main_thread():
            return
        if getattr(signal.getsignal(signal.SIGTERM), "distrain_sink", None) is self:
            restore({signal.SIGTERM: previous})

    def flush_for_signal(self) -> None:
        if os.getpid() != self.pid:
            return  # a forked child: its lock and buffer are copies
        if not self.lock.acquire(timeout=_SIGNAL_LOCK_TIMEOUT):
            return  # the interrupted main thread holds it mid-write: nothing safe to do
        try:
            self._flush_locked()
        finally:
            self.lock.release()


def _make_synchronous(file_writer: Any) -> Any:
    """Make a tensorboardX ``FileWriter`` write events at once; return its records writer.

    Its ``EventFileWriter`` hands events to a thread through a queue and ``flush()`` does not wait
    for that queue; writing directly (a few microseconds per event, under tensorboardX's own
    lock) makes ``flush()`` exact. Returns None (keeping the queued path) if the layout of this
    tensorboardX version is unknown.
    """
    events = getattr(file_writer, "event_writer", None)
    records: Any = getattr(events, "_ev_writer", None)
    write = getattr(records, "write_event", None)
    if events is None or not callable(write) or not callable(getattr(records, "flush", None)):
        return None
    events.add_event = write
    return records


def _sigterm_handler(sink: Sink, previous: Any) -> Callable[[int, FrameType | None], None]:
    """Flush, then let SIGTERM do what it did before (by default: end the process)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        sink.flush_for_signal()
        if callable(previous):
            previous(signum, frame)
            return
        # SIG_DFL: die of SIGTERM as before, so the launcher still sees "killed by SIGTERM".
        install([signum], signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    handler.distrain_sink = sink  # type: ignore[attr-defined]
    return handler
