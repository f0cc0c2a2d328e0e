"""No worker outlives its launch, whatever moment a stop signal arrives.

torch elastic forwards SIGTERM/SIGINT to the workers, waits the grace period
(``--term-timeout``) and kills what is left, but only once the workers are in its books. A
signal that lands *while it starts them* (``PContext.start``) escapes that: if the process
context is not built yet, the workers started so far are never signalled (orphans that may
never exit); if it is built, its clean-up waits elastic's fixed 30 s, not the grace period. A
loaded machine makes that window wide enough to hit.

So, around every local launch:

* :class:`GraceWatch` notes each stop signal (through ``signal.set_wakeup_fd``, beside elastic's
  own handlers) and kills the workers still alive ``term_timeout`` + 1 s after the first one;
* :meth:`WorkerReaper.stop_leftovers` runs once elastic has returned: the workers it left get
  the signal, the grace period and then SIGKILL, and are reaped;
* the launcher is the *child subreaper* while it runs (Linux): a worker whose parent, the fork
  server, has exited is re-parented to the launcher, not to init, so it can still be found.

Workers are told apart from the caller's own children by a snapshot taken before the launch.
Linux only (``/proc``); elsewhere these are no-ops and torch elastic's handling stands alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from distrain.signals import HANDLED_SIGNALS

KILL_MARGIN_S = 1.0  # after the grace period, before the watch kills: elastic's own kill goes first
_POLL_S = 0.02
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _processes() -> Iterator[tuple[int, str, int]]:
    """(pid, state, parent pid) of every process in ``/proc``; nothing where there is none."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                state_ppid = _state_and_parent(int(entry.name))
                if state_ppid is not None:
                    yield int(entry.name), *state_ppid


def child_pids(parent: int) -> set[int]:
    """Live (not zombie) children of ``parent``, read from ``/proc``; empty where there is none."""
    return {pid for pid, state, ppid in _processes() if ppid == parent and state not in "ZX"}


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (command) state ppid ...": the command may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    state_ppid = _state_and_parent(pid)
    return state_ppid is not None and state_ppid[0] not in "ZX"


def _helper_pids() -> set[int]:
    """multiprocessing's own helpers in this process: the fork server and resource tracker."""
    server = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    return {pid for pid in (server, tracker) if pid}


class WorkerReaper:
    """Finds this launch's worker processes and stops those elastic left behind."""

    __slots__ = (
        "_callers_children",
        "_own_pid",
        "_previous_subreaper",
        "_term_timeout",
        "received",
    )

    def __init__(self, *, term_timeout: float) -> None:
        self._own_pid = os.getpid()
        self._callers_children = frozenset(child_pids(self._own_pid))
        self._term_timeout = term_timeout
        self._previous_subreaper: int | None = None
        self.received: signal.Signals | None = None  # the first stop signal, noted by GraceWatch

    def __enter__(self) -> WorkerReaper:
        self._previous_subreaper = _set_subreaper(True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous_subreaper is not None:
            _set_subreaper(bool(self._previous_subreaper))
        _reap_finished(self._adopted_zombies())

    def workers(self) -> set[int]:
        """Processes this launch started (or adopted) that are still alive."""
        helpers = _helper_pids()
        found = child_pids(self._own_pid) - self._callers_children - helpers
        for server in helpers:
            found |= child_pids(server)  # forkserver workers are the server's children
        return found

    def stop_leftovers(self) -> set[int]:
        """Forward the stop signal (SIGTERM if none) to the workers still alive, wait the grace
        period, kill the rest; returns their pids."""
        leftovers = self.workers()
        if leftovers:
            stop_processes(leftovers, sig=self.received or signal.SIGTERM, grace=self._term_timeout)
        return leftovers

    def _adopted_zombies(self) -> set[int]:
        return {pid for pid, state, ppid in _processes()
                if state == "Z" and ppid == self._own_pid and pid not in self._callers_children}


def stop_processes(pids: Iterable[int], *, sig: signal.Signals, grace: float) -> None:
    """``sig`` to each, up to ``grace`` seconds for them to exit, then SIGKILL; children reaped."""
    pending = set(pids)
    _signal_all(pending, sig)
    pending = _wait_gone(pending, grace)
    _signal_all(pending, signal.SIGKILL)
    _reap_finished(_wait_gone(pending, 5.0))


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    """Reap what exits, for up to ``seconds``; returns those still alive."""
    deadline = time.monotonic() + seconds
    while pids and time.monotonic() < deadline:
        _reap_finished(pids)
        pids = {pid for pid in pids if _alive(pid)}
        if pids:
            time.sleep(_POLL_S)  # a handful of pids for a bounded time: polling is simplest
    return pids


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap_finished(pids: Iterable[int]) -> None:
    """Collect the exit status of those that are our own children (others: not ours to reap)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _set_subreaper(on: bool) -> int | None:
    """Make this process the child subreaper (Linux); returns the previous setting, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
            return None
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return previous.value


class GraceWatch:
    """Kills the launch's workers ``term_timeout`` + 1 s after the first stop signal, if alive.

    The backstop for a signal elastic does not act on in time (see the module docstring). Uses
    the signal wakeup fd, so it sees signals whatever Python handler is installed; main thread
    only (elsewhere, as for elastic itself, no signal handling), the previous fd is put back.
    """

    __slots__ = ("_done", "_grace", "_previous_fd", "_read_fd", "_reaper", "_thread", "_write_fd")

    def __init__(self, reaper: WorkerReaper, *, term_timeout: float) -> None:
        self._reaper = reaper
        self._grace = term_timeout
        self._read_fd = self._write_fd = self._previous_fd = -1
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def __enter__(self) -> GraceWatch:
        if threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        except ValueError:
            self._close_pipe()
            return self
        self._thread = threading.Thread(target=self._watch, name="distrain-grace-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        self._done.set()
        os.close(self._write_fd)  # the watch's read returns EOF
        self._thread.join()
        os.close(self._read_fd)

    def _close_pipe(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            os.close(fd)

    def _watch(self) -> None:
        handled = {int(sig) for sig in HANDLED_SIGNALS}
        while self._reaper.received is None:
            data = os.read(self._read_fd, 64)
            if not data:
                return
            for number in data:
                if number in handled:
                    self._reaper.received = signal.Signals(number)
                    break
        if not self._done.wait(self._grace + KILL_MARGIN_S):
            _signal_all(self._reaper.workers(), signal.SIGKILL)
        # Drain until the launch ends so the wakeup fd never fills.
        while os.read(self._read_fd, 64):
            pass


@contextlib.contextmanager
def workers_never_outlive(*, term_timeout: float) -> Iterator[WorkerReaper]:
    """The subreaper, the grace watch and (by the caller, at the end) ``stop_leftovers``."""
    with WorkerReaper(term_timeout=term_timeout) as reaper, GraceWatch(reaper, term_timeout=term_timeout):
        yield reaper
