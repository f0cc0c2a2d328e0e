"""Clean exits: no process group outlives cleanup, and fresh 4-rank DDP launches never abort.

The abort (SIGABRT, "terminate called without an active exception") happens when a group's
gloo threads are still running at interpreter finalization: one that finishes a collective then
needs the GIL and aborts the process. So the first test checks the cause on every run (no group
thread left after ``ddp.cleanup()``); the second counts the symptom. The longer proof is ``make
stress`` (200 DDP runs, 50 FSDP, 50 Ray, beside raw torchrun). No retries: one abort fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.teardown_stress import HERE, count_aborts
from tests.helpers import REPO, assert_ok, child_env, distrain

# Before the fix 1 two-rank run in 9 aborted (1 process in 18): 4 runs of 4 ranks (16 exits) catch
# it 60 % of the time in about a minute of make test, which must stay well under 30 minutes on two
# cores; make stress runs 200 and is the measurement.
RUNS, RANKS = 4, 4
# Threads of a gloo process group: its work loops and its transport's event loop.
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_no_process_group_thread_outlives_cleanup(tmp_path: Path, strategy: str) -> None:
    # spawn: a fresh interpreter imports torch.distributed.nn.functional only when DDP is built,
    # after the group formed, so its default arguments hold the group (docs/troubleshooting.md).
    script = str(REPO / "tests" / "scripts" / "teardown_threads.py")
    assert_ok(distrain("launch", "--start-method", "spawn", "--nproc-per-node", "2", script,
                       env={"OUT_DIR": str(tmp_path), "STRATEGY": strategy}))
    for rank in (0, 1):
        names = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert not [name for name in names if name in GROUP_THREADS], (rank, names)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_runs_never_abort_at_teardown() -> None:
    # Fresh interpreters (spawn): the path where interpreter finalization can abort. Workers
    # forked from the preloaded server leave through os._exit and never finalize.
    command = [sys.executable, "-m", "distrain", "launch", "--start-method", "spawn",
               "--nproc-per-node", str(RANKS), str(HERE / "scripts" / "distrain_ddp_tiny.py")]
    tally = count_aborts("ddp", command, RUNS, env=child_env())
    assert (tally.aborts, tally.other_failures) == (0, 0), tally.line()
