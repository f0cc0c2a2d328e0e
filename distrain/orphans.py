"""A worker whose launcher is gone stops, within the launcher's own grace period.

A launcher that is SIGKILLed (the OOM killer, ``kill -9``, a scheduler) cannot stop its workers.
torch asks the kernel to send forked workers SIGINT when their parent dies (``PR_SET_PDEATHSIG``)
and sends nothing to spawned ones; and Python handles a signal only between bytecodes, so a
worker blocked in C++ (a collective whose peers are stuck too, a store wait) would run on,
orphaned, until its own timeout (30 minutes by default for a collective).

So under ``distrain launch`` each worker watches its launcher's process (a pidfd, no polling):
once the launcher is gone, the worker gets what a live launcher would have given it after a
stop signal: ``--term-timeout`` seconds to leave by itself, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time

LAUNCHER_PID_ENV = "DISTRAIN_LAUNCHER_PID"
TERM_TIMEOUT_ENV = "DISTRAIN_TERM_TIMEOUT"
ENV_KEYS = frozenset({LAUNCHER_PID_ENV, TERM_TIMEOUT_ENV})


def launcher_environ(term_timeout: float) -> dict[str, str]:
    """What the launcher (this process) exports for its workers' watch."""
    return {LAUNCHER_PID_ENV: str(os.getpid()), TERM_TIMEOUT_ENV: str(float(term_timeout))}


_watching: list[int] = []  # the pid of the process watching (a forked child has its own)


def watch_launcher() -> bool:
    """Start this worker's watch on its launcher; False without a launcher that asked for one.

    Idempotent per process. A launcher already gone counts as gone now.
    """
    if os.getpid() in _watching:
        return True
    try:
        launcher = int(os.environ[LAUNCHER_PID_ENV])
        grace = float(os.environ[TERM_TIMEOUT_ENV])
    except (KeyError, ValueError):
        return False
    if launcher == os.getpid():  # a launch from inside a worker's own launcher process
        return False
    try:
        pidfd: int | None = os.pidfd_open(launcher)
    except ProcessLookupError:
        pidfd = None
    except OSError:  # no pidfd (a kernel before 5.3): the watch is off
        return False
    threading.Thread(target=_stop_when_gone, args=(pidfd, grace), name="distrain-launcher-watch",
                     daemon=True).start()
    _watching[:] = [os.getpid()]
    return True


def _stop_when_gone(pidfd: int | None, grace: float) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the launcher has exited
        with contextlib.suppress(OSError):
            os.close(pidfd)
    time.sleep(grace)  # the worker may be leaving by itself (SIGINT, a peer's error)
    os.kill(os.getpid(), signal.SIGKILL)
