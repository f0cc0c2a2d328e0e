"""Clean exits: fresh 4-rank DDP launches, zero teardown aborts (the gloo SIGABRT at exit).

The longer proof is ``make stress`` (200 DDP runs, 50 FSDP, 50 Ray, beside raw torchrun).
No retries: a single abort fails the test.
"""

from __future__ import annotations

import sys

import pytest

from bench.teardown_stress import HERE, count_aborts
from tests.helpers import child_env

# Before the fix 1 two-rank run in 9 aborted (1 process in 18): 6 runs of 4 ranks (24 exits) miss
# it 25 % of the time, with half the launcher start-ups of 12 two-rank runs. make stress runs 200.
RUNS, RANKS = 6, 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_runs_never_abort_at_teardown() -> None:
    # Fresh interpreters (spawn): the path where interpreter finalization can abort. Workers
    # forked from the preloaded server leave through os._exit and never finalize.
    command = [sys.executable, "-m", "distrain", "launch", "--start-method", "spawn",
               "--nproc-per-node", str(RANKS), str(HERE / "scripts" / "distrain_ddp_tiny.py")]
    tally = count_aborts("ddp", command, RUNS, env=child_env())
    assert (tally.aborts, tally.other_failures) == (0, 0), tally.line()
