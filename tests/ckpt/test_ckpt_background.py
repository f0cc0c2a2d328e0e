"""The low-priority background runner of async checkpoint writes (distrain/ckpt/background.py)."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time

import pytest

from distrain.ckpt import CheckpointError
from distrain.ckpt.background import LOW_NICE, BackgroundWriter

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread priorities are set by thread id on Linux only")
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}


def priorities() -> tuple[int, int | None]:
    """(nice, ioprio) of the calling thread; ioprio None where it cannot be read."""
    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    number = _IOPRIO_GET.get(platform.machine())
    if number is None:
        return nice, None
    value = ctypes.CDLL(None, use_errno=True).syscall(number, 1, tid)
    return nice, (value if value >= 0 else None)


def test_the_job_and_the_threads_it_starts_run_at_low_priority_the_caller_does_not() -> None:
    seen: dict[str, tuple[int, int | None]] = {}
    done = threading.Event()

    def job() -> None:
        seen["job"] = priorities()
        helper = threading.Thread(target=lambda: seen.__setitem__("helper", priorities()))
        helper.start()
        helper.join()
        done.set()

    caller = priorities()
    writer = BackgroundWriter()
    writer.submit(job)
    assert done.wait(timeout=60)  # before wait(): waiting gives the job the caller's priority
    writer.wait()
    assert priorities() == caller and caller[0] < LOW_NICE
    assert seen["job"][0] == LOW_NICE and seen["helper"][0] == LOW_NICE
    if seen["job"][1] is not None:  # best effort (class 2), lowest level (7)
        assert seen["job"][1] == (2 << 13) | 7 and seen["helper"][1] == (2 << 13) | 7


def test_nice_none_keeps_the_callers_priority_and_errors_surface_once() -> None:
    seen: list[int] = []
    writer = BackgroundWriter(what="snapshot copy", nice=None)
    writer.submit(lambda: seen.append(priorities()[0]))
    writer.wait()
    assert seen == [priorities()[0]]

    def failing() -> None:
        raise OSError(28, "No space left on device")

    writer.submit(failing)
    with pytest.raises(CheckpointError, match=r"^background snapshot copy failed: .*No space left"):
        writer.wait()
    writer.wait()  # raised once
    assert not writer.busy


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a thread's priority back needs root (or RLIMIT_NICE)")
def test_a_job_the_caller_waits_for_gets_the_callers_priority_back() -> None:
    lowered = threading.Event()
    seen: list[int] = []

    def job() -> None:
        lowered.set()
        deadline = time.monotonic() + 60
        while priorities()[0] == LOW_NICE and time.monotonic() < deadline:
            time.sleep(0.01)  # a poll with a deadline: the job runs until wait() raises it
        seen.append(priorities()[0])

    writer = BackgroundWriter()
    writer.submit(job)
    assert lowered.wait(timeout=60)
    writer.wait()
    assert seen == [priorities()[0]]
