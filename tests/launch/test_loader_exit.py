"""A script that leaves DataLoader iterators alive exits at once under the fast start (issue 21.1).

Cause: after ``runpy`` returns, the script's globals are cyclic garbage; a live multi-process
iterator collected by a gc pass (``ddp.cleanup()``'s) had its queue feeders stopped by weakref
finalizers before its ``__del__`` sent the workers their stop message: 5 s per worker.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import PYTHON, REPO, assert_workers_gone, child_env, kill_group

SCRIPT = str(REPO / "tests" / "scripts" / "loader_exit.py")
# The goal. A rank exits about 0.2 s after its last line on a quiet 2-core machine (1.4-1.6 s
# at load 18-28); the bug cost 5 s per loader worker.
EXIT_WITHIN = 1.5


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def rank_exit_delays(tmp_path: Path, start_method: str) -> tuple[list[float], float]:
    """(seconds from each rank's last line to its exit, seconds from the last line to the launcher's)."""
    out = tmp_path / start_method
    out.mkdir()
    proc = subprocess.Popen(
        [PYTHON, "-m", "distrain", "launch", "--start-method", start_method, "--nproc-per-node", "2",
         SCRIPT, "1"], env=child_env({"LOADER_EXIT_OUT": str(out)}), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        lasts = [out / "last-0", out / "last-1"]
        while not all(p.exists() and p.read_text() for p in lasts):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.02)
        pids = {int((out / f"pid-{r}").read_text()): r for r in range(2)}
        exited: dict[int, float] = {}
        while len(exited) < len(pids) and time.monotonic() < deadline:
            exited.update({pid: time.time() for pid in pids if pid not in exited and _gone(pid)})
            time.sleep(0.02)
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        launcher_end = time.time()
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 0, output[-3000:]
    assert_workers_gone(out)
    delays = [exited[pid] - float((out / f"last-{rank}").read_text()) for pid, rank in pids.items()]
    last = max(float(p.read_text()) for p in lasts)
    return delays, launcher_end - last


@pytest.mark.timeout(200)
def test_forked_ranks_with_live_loader_iterators_exit_within_a_moment_of_their_last_line(
        tmp_path: Path) -> None:
    delays, launcher = rank_exit_delays(tmp_path, "forkserver")
    assert max(delays) < EXIT_WITHIN, (
        f"ranks exited {delays} s after their last line (launcher {launcher:.1f} s); 5 s per loader "
        "worker means the iterator's shutdown message was lost")
