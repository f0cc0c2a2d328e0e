"""``--hang-timeout`` under ``distrain launch --launcher ray``, on a real 2-node loopback Ray cluster.

The cluster and the leak check are tests/helpers/ray_harness.py's (one cluster for this module). The script
is test_hangs.py's: rank 1 sleeps at step 5 while rank 0 waits in DDP's all-reduce.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Read when Ray is imported: the cluster then binds the loopback (see pitfalls.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

from tests import helpers
from tests.helpers import REPO, assert_workers_gone, distrain, ray_harness
from tests.helpers.ray_harness import Launcher, LoopbackCluster

# The loopback cluster (one per module) and the leak check that knows its processes.
cluster = ray_harness.cluster
no_leaks = ray_harness.no_leaks

# Launches still running when a test ends are killed with their session.
launches = helpers.launches
pytestmark = pytest.mark.ray
SCRIPT = REPO / "tests" / "scripts" / "hang_train.py"
BOUND_S = 240  # start-up alone can take a minute on the shared 2-core machine


def sleep_line() -> int:
    for number, line in enumerate(SCRIPT.read_text().splitlines(), start=1):
        if "# HANG: sleep" in line:
            return number
    raise AssertionError(f"no '# HANG: sleep' line in {SCRIPT}")


@pytest.mark.timeout(300)
def test_a_hung_ray_rank_is_named_with_its_line_and_the_group_stopped(
        cluster: LoopbackCluster, tmp_path: Path, launches: list[Launcher]) -> None:
    logs, pids = tmp_path / "logs", tmp_path / "pids"
    pids.mkdir()
    launch = Launcher(cluster, "--num-workers", "2", "--hang-timeout", "10", "--rdzv-id", "rayhang",
                      "--log-dir", str(logs), str(SCRIPT), "--hang-rank", "1", "--hang-step", "5",
                      "--pids", str(pids))
    launches.append(launch)
    launch.wait_for("HANGING NOW", 1, BOUND_S)
    hung_at = time.monotonic()
    assert launch.finish(BOUND_S) == 1, launch.text()
    took = time.monotonic() - hung_at
    assert took < 45, f"the launcher exited {took:.0f} s after the hang:\n{launch.text()}"
    text = launch.text()
    summary = text[text.index("distrain: hang:"):]
    first = next(line.strip() for line in summary.splitlines()
                 if line.strip().startswith(("stuck", "waiting")))
    assert first.startswith("stuck: rank 1 ") and f"hang_train.py:{sleep_line()} in main" in first, \
        summary
    assert "waiting: rank 0 " in summary and "all_reduce" in summary, summary
    assert "rank 1 never entered collective #" in summary, summary
    folder = logs / "rayhang" / "stacks" / "hang-attempt0"
    rank0 = (folder / "rank0.txt").read_text()
    assert "_engine_run_backward" in rank0, rank0
    assert "hang_train.py" in (folder / "rank1.txt").read_text()
    assert_workers_gone(pids)


@pytest.mark.timeout(300)
def test_a_hung_ray_group_restarts_and_completes(cluster: LoopbackCluster, tmp_path: Path,
                                                 launches: list[Launcher]) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    launch = Launcher(cluster, "--num-workers", "2", "--hang-timeout", "10", "--max-restarts", "1",
                      str(SCRIPT), "--hang-rank", "1", "--hang-step", "5", "--steps", "8",
                      "--ckpt", str(tmp_path / "ckpt"), "--pids", str(pids))
    launches.append(launch)
    launch.wait_for("HANGING NOW", 1, BOUND_S)
    # On demand, while it hangs: `distrain stacks` signals the Ray launcher, which prints them.
    asked = distrain("stacks", str(launch.proc.pid), timeout=60)
    assert asked.returncode == 0 and "runs on Ray" in asked.stderr, asked.stderr
    launch.wait_for("distrain: stacks of every rank", 1, 60)
    assert launch.finish(BOUND_S) == 0, launch.text()
    text = launch.text()
    dump = text[text.index("distrain: stacks of every rank"):]
    assert "--- rank 0 " in dump and "--- rank 1 " in dump and "hang_train.py" in dump, dump
    assert "stuck: rank 1 " in text and "restarting it (1 of 1)" in text, text
    assert "finished 8 steps (attempt 1)" in text, text
    assert_workers_gone(pids)
