"""A launcher that is SIGKILLed leaves no worker behind, even one blocked in C++.

Nothing can stop the workers of a launcher killed outright: torch gives forked workers SIGINT
when their parent dies, which a rank blocked in a collective never handles, and spawned ones get
nothing. Each worker watches its launcher and SIGKILLs itself ``--term-timeout`` seconds after
it is gone (distrain.orphans).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import PYTHON, REPO, child_env, kill_group, wait_for_files

TERM_TIMEOUT_S = 1
# The collective's own timeout is 600 s: a worker still there after this long was not stopped.
GONE_WITHIN_S = TERM_TIMEOUT_S + 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_blocked_in_a_collective_leave_after_their_launcher_is_killed(
        tmp_path: Path, start_method: str) -> None:
    command = [PYTHON, "-m", "distrain", "launch", "--start-method", start_method,
               "--term-timeout", str(TERM_TIMEOUT_S), "--nproc-per-node", "2",
               str(REPO / "tests" / "scripts" / "stuck_in_cpp.py")]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=child_env({"OUT_DIR": str(tmp_path)}), start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        wait_for_files([tmp_path / "pid-0", tmp_path / "pid-1"], launcher)
        workers = [psutil.Process(int((tmp_path / f"pid-{rank}").read_text())) for rank in (0, 1)]
        left_behind = [proc for proc in psutil.Process(launcher.pid).children(recursive=True)
                       if proc not in workers]  # the fast start's server and resource tracker
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs([*workers, *left_behind], timeout=GONE_WITHIN_S)
        assert not alive, f"still running {GONE_WITHIN_S} s after their launcher was killed: {alive}"
    finally:
        kill_group(launcher.pid)
        for proc in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
