"""Work that runs beside training and yields to it: one job at a time, at low CPU and I/O priority.

An asynchronous checkpoint write (and an in-memory snapshot's copy-out) serializes, digests and
writes hundreds of MB while training goes on in the same process, on the same cores. At the
same priority the kernel gives the writer's threads an equal share: on a machine whose cores
training keeps busy, every second of background CPU is a second taken from training. Here the
job's thread lowers its own priority first, and every thread it starts inherits it:

* CPU: ``nice`` :data:`LOW_NICE` for this thread only (Linux applies ``setpriority`` to one
  thread when given its thread id): a runnable training thread gets the CPU first, and the job
  runs in the gaps training leaves (the Python dispatch between operators, a collective's wait,
  the data loader) plus a small share of a busy core (nice 10 weighs about a tenth of nice 0),
  so it finishes between two saves instead of in the next one's wait (at nice 19, a share of
  about 1 %, it did not);
* I/O: the lowest best-effort I/O priority (``ioprio_set``), so its writes queue behind the
  training's reads on schedulers that honour it (BFQ); not the idle class, which could starve
  the write on a disk that is never idle.

Jobs release the GIL in their heavy parts (writes, digests), so a low-priority job holding the
interpreter lock for long is not what keeps training waiting. Once training waits for the job
(:meth:`BackgroundWriter.wait`), low priority would only make it wait longer: the job's threads
get the caller's CPU priority back for the rest (where the system allows raising it: root, or
``RLIMIT_NICE``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading
from collections.abc import Callable

from distrain.affinity import unpin_this_thread
from distrain.ckpt.store import CheckpointError

LOW_NICE = 10  # docs/performance.md: 19 starved the write into the next wait
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # syscall numbers; elsewhere I/O priority is left as is
_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread
_IOPRIO_CLASS_BE, _IOPRIO_LOWEST_LEVEL = 2, 7


def _thread_nice(tid: int) -> int | None:
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is not a process id
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (OSError, AttributeError):
        return None


def lower_priority(nice: int = LOW_NICE) -> None:
    """Lower the calling thread's CPU priority to ``nice`` (never raise it) and its I/O priority
    to best-effort level 7. Linux only (elsewhere the priority is kept), best effort."""
    if not sys.platform.startswith("linux"):  # per-thread priorities by thread id: Linux only
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        current = _thread_nice(tid)
        if current is not None and current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        syscall = ctypes.CDLL(None, use_errno=True).syscall
        syscall(number, _IOPRIO_WHO_PROCESS, tid, (_IOPRIO_CLASS_BE << 13) | _IOPRIO_LOWEST_LEVEL)


class BackgroundWriter:
    """Runs one job at a time on a low-priority thread; its error is raised by the next
    :meth:`wait` or :meth:`submit`, as a :class:`CheckpointError` naming ``what`` failed.

    The thread is not a daemon: an interpreter exiting normally finishes the job first.
    ``nice``: the job thread's CPU priority (None: unchanged, the caller's).
    """

    def __init__(self, *, what: str = "checkpoint write", nice: int | None = LOW_NICE) -> None:
        self.what = what
        self.nice = nice
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        name = f"distrain-{self.what.replace(' ', '-')}"
        self._thread = threading.Thread(target=self._run, args=(job,), name=name)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        unpin_this_thread()  # any core of the node, not only this rank's (distrain.affinity)
        if self.nice is not None:
            lower_priority(self.nice)
        try:
            job()
        except BaseException as error:  # kept for the caller: a background error is never lost
            self._error = error

    def wait(self) -> None:
        """Join the job in flight, if any; raise its error (once) as a CheckpointError."""
        if self._thread is not None:
            if self._thread.is_alive():
                self._restore_priority()
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointError):
                raise CheckpointError(f"background {self.what} failed: {error}") from error
            raise CheckpointError(f"background {self.what} failed: {error!r}") from error

    def _restore_priority(self) -> None:
        """The caller now waits for the job: its threads (ours, named ``distrain-...``, still at
        the lowered priority) get the caller's CPU priority back. Best effort."""
        if self.nice is None:
            return
        caller = _thread_nice(threading.get_native_id())
        if caller is None or caller >= self.nice:
            return
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None or not thread.name.startswith("distrain-") or _thread_nice(tid) != self.nice:
                continue
            with contextlib.suppress(OSError):  # raising a priority needs root or RLIMIT_NICE
                os.setpriority(os.PRIO_PROCESS, tid, caller)
